r"""Sensor-3D: per-slice U-Net encoder/decoder with bidirectional ConvLSTMs along z.

  fibseg train --config=sensor3d --workdir=runs/s3d \
    --config.data.path=vol.zarr --config.data.channels=ICE,TLD --config.data.slices=3 \
    --config.data.patch=192 --config.train.batch_size=8 --config.train.steps=2000

Semi-supervised training from the unannotated slices (--config.semi.weight=1) is off:
it did not raise held-out mean IoU on a synthetic or a real stack (BUILD_NOTES.md).
"""

from fibseg_jax import models
from fibseg_jax.train.config import base_config


def get_config():
  config = base_config()
  config.model.update(models.default_config("sensor3d"))
  config.model.name = "sensor3d"
  config.model.num_classes = -1
  return config
