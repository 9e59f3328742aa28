"""`fibseg ablation`: see fibseg_jax/cli/ablation.py (the recipe ablation with seeds)."""

from fibseg_jax.cli import ablation

if __name__ == "__main__":
  ablation.run()
