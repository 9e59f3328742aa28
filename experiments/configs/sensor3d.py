"""`fibseg train --config=sensor3d`: fibseg_jax/configs/sensor3d.py, at its old path."""

from fibseg_jax.configs.sensor3d import get_config  # noqa: F401
