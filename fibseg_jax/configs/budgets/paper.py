"""An accelerator: the networks at their default widths (BasicUNet, Sensor-3D), the
README's training setting, 3 seeds everywhere.

  fibseg study --out=study/ --budget=paper
"""

from fibseg_jax.configs.budgets import base


def get_config():
  config = base.get_config()
  config.name = "paper"
  config.shape = (24, 1024, 1024)
  config.steps = 2000
  config.patch = 192
  config.eval_every = 200
  config.warmup_steps = 100
  config.unet_features = (32, 32, 64, 128, 256, 32)
  config.sensor3d_features = (16, 32, 64, 128)
  config.workers = 4
  config.tile = 512
  config.overlap = 64
  config.infer_batch = 8
  config.seeds = (0, 1, 2)
  config.forest.n_estimators = 100
  config.sweep_levels = (0.0, 0.5, 1.0, 1.5, 2.0)
  config.sweep_seeds = (0, 1, 2)
  return config
