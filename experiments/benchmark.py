"""`fibseg bench`: see fibseg_jax/cli/benchmark.py (kept so the script path keeps working)."""

from fibseg_jax.cli import benchmark

if __name__ == "__main__":
  benchmark.run()
