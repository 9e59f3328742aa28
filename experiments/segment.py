"""`fibseg segment`: see fibseg_jax/cli/segment.py (kept so the script path keeps working)."""

from fibseg_jax.cli import segment

if __name__ == "__main__":
  segment.run()
