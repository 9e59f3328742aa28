"""`fibseg evaluate`: see fibseg_jax/cli/evaluate.py (kept so the script path keeps working)."""

from fibseg_jax.cli import evaluate

if __name__ == "__main__":
  evaluate.run()
