"""The `fibseg` command: one subcommand per entry point.

  fibseg ingest --channel=ICE='data/ICE/*.tif' ... --out=vol.zarr
  fibseg train --config=unet --workdir=runs/unet ...
  fibseg --help                       # every subcommand, one line each

Each subcommand is a module here holding its absl flags and `main` (ingest, train,
segment, evaluate, suggest, study, sweep, semi_study, benchmark, make_synthetic);
`fibseg_jax.cli.main` imports only the one asked for, because absl's flags are global
and the subcommands' flags would collide. experiments/*.py are thin shims over the same
modules. Nothing is imported here, so `fibseg --help` starts without JAX.
"""
