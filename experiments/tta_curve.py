"""`fibseg tta-curve`: see fibseg_jax/cli/tta_curve.py (mean IoU against TTA passes)."""

from fibseg_jax.cli import tta_curve

if __name__ == "__main__":
  tta_curve.run()
