"""`fibseg train --config=unet`: fibseg_jax/configs/unet.py, at its old path."""

from fibseg_jax.configs.unet import get_config  # noqa: F401
