r"""2.5D U-Net (MONAI BasicUNet layout): the slab's slices x channels are input features.

  fibseg train --config=unet --workdir=runs/unet \
    --config.data.path=vol.zarr --config.data.channels=ICE,TLD --config.data.slices=3

The peak learning rate is the base 1e-3. A 3e-3 peak (the default from 2026-12-02) was
tried on the suite of stacks (docs/results.md, "Defaults decided on the suite"): it
raised held-out mean IoU on five of six stacks but lowered it on the SBEM stack by more
than its seed spread, so under the rule for a default it went back to 1e-3. On ssTEM-like
stacks try --config.train.learning_rate=3e-3 (+7.6 points on drosophila_vnc there).
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
