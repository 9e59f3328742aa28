"""`fibseg train`: see fibseg_jax/cli/train.py (kept so the script path keeps working)."""

from fibseg_jax.cli import train

if __name__ == "__main__":
  train.run()
