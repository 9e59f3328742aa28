"""`fibseg make-synthetic`: see fibseg_jax/cli/make_synthetic.py (kept so this path works)."""

from fibseg_jax.cli import make_synthetic

if __name__ == "__main__":
  make_synthetic.run()
