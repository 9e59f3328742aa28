"""`fibseg ingest`: see fibseg_jax/cli/ingest.py (kept so the script path keeps working)."""

from fibseg_jax.cli import ingest

if __name__ == "__main__":
  ingest.run()
