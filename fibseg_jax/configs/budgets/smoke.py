"""The whole pipeline on a tiny stack in about a minute (the tests); numbers mean nothing.

fibseg study --out=/tmp/smoke/ --budget=smoke
"""

from fibseg_jax.configs.budgets import base


def get_config():
  config = base.get_config()
  config.name = "smoke"
  config.shape = (12, 64, 64)
  config.train_slices = (3, 5, 7)
  config.eval_slices = (9,)
  config.steps = 2
  config.batch_size = 2
  config.patch = 32
  config.val_block = 32
  config.eval_every = 2
  config.warmup_steps = 1
  config.unet_depth = 1
  config.unet_features = (4, 8)
  config.sensor3d_depth = 1
  config.sensor3d_features = (4, 8)
  config.workers = 1
  config.tile = 64
  config.overlap = 16
  config.infer_batch = 2
  config.spread_seeds = (0, 1)
  config.forest.n_estimators = 4
  config.forest.samples_per_class = 200
  config.forest.sigma_max = 4.0
  config.forest.tile = 64
  config.cleaning.levels = 2
  config.cleaning.patch_distance = 2
  config.sweep_levels = (0.0, 1.0)
  return config
