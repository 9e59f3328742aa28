"""`fibseg ranking`: see fibseg_jax/cli/ranking.py."""

from fibseg_jax.cli import ranking

if __name__ == "__main__":
  ranking.run()
