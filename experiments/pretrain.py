"""`fibseg pretrain`: see fibseg_jax/cli/pretrain.py (kept so the script path keeps working)."""

from fibseg_jax.cli import pretrain

if __name__ == "__main__":
  pretrain.run()
