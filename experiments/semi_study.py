"""`fibseg semi-study`: see fibseg_jax/cli/semi_study.py (kept so the script path keeps working)."""

from fibseg_jax.cli import semi_study

if __name__ == "__main__":
  semi_study.run()
