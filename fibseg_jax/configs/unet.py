r"""2.5D U-Net (MONAI BasicUNet layout): the slab's slices x channels are input features.

  fibseg train --config=unet --workdir=runs/unet \
    --config.data.path=vol.zarr --config.data.channels=ICE,TLD --config.data.slices=3

The peak learning rate is 3e-3, not the base 1e-3: at the quick budget it raised held-out
mean IoU on both stacks measured, every seed (the recipe ablation, BUILD_NOTES.md).
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
  config.train.learning_rate = 3e-3
  return config
