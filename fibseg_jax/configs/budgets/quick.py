"""2 CPU cores, about an hour for the study and one for the sweep.

  fibseg study --out=study/ --budget=quick

A U-Net at half the BasicUNet widths, patch 128, batch 8, 300 steps (the setting of the
earlier partial comparison); Sensor-3D at half its default widths. Set from a measured
U-Net row (BUILD_NOTES.md, "Study and sweep"); `steps` is the knob. (These are the base
values: this file only names them.)
"""

from fibseg_jax.configs.budgets import base


def get_config():
  config = base.get_config()
  config.name = "quick"
  return config
