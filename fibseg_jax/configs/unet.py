r"""2.5D U-Net (MONAI BasicUNet layout): the slab's slices x channels are input features.

  fibseg train --config=unet --workdir=runs/unet \
    --config.data.path=vol.zarr --config.data.channels=ICE,TLD --config.data.slices=3

Semi-supervised training from the unannotated slices (--config.semi.weight=1) is off:
it did not raise held-out mean IoU on a synthetic or a real stack (BUILD_NOTES.md).
"""

from fibseg_jax import models
from fibseg_jax.train.config import base_config


def get_config():
  config = base_config()
  config.model.update(models.default_config("unet"))
  config.model.name = "unet"
  config.model.num_classes = -1
  return config
