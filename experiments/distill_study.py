"""`fibseg distill-study`: see fibseg_jax/cli/distill_study.py (distilling the ensemble)."""

from fibseg_jax.cli import distill_study

if __name__ == "__main__":
  distill_study.run()
