"""`python -m fibseg_jax.cli COMMAND ...`: the same as the installed `fibseg` command."""

from fibseg_jax.cli.main import run

run()
