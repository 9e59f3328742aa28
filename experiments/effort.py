"""`fibseg effort`: see fibseg_jax/cli/effort.py."""

from fibseg_jax.cli import effort

if __name__ == "__main__":
  effort.run()
