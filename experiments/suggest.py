"""`fibseg suggest`: see fibseg_jax/cli/suggest.py (kept so the script path keeps working)."""

from fibseg_jax.cli import suggest

if __name__ == "__main__":
  suggest.run()
