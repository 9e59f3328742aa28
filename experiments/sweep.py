"""`fibseg sweep`: see fibseg_jax/cli/sweep.py (kept so the script path keeps working)."""

from fibseg_jax.cli import sweep

if __name__ == "__main__":
  sweep.run()
