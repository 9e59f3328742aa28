"""`fibseg preview`: see fibseg_jax/cli/preview.py (kept so the script path keeps working)."""

from fibseg_jax.cli import preview

if __name__ == "__main__":
  preview.run()
