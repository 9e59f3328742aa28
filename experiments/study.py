"""`fibseg study`: see fibseg_jax/cli/study.py (kept so the script path keeps working)."""

from fibseg_jax.cli import study

if __name__ == "__main__":
  study.run()
