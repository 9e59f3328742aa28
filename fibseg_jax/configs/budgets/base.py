"""What every budget shares; `quick.py`, `paper.py` and `smoke.py` start from it.

Fields are those of `fibseg_jax.study.budget.Budget` (its docstring says what each
means); `forest` and `cleaning` hold overrides of `baselines.ForestConfig` and
`baselines.CleaningConfig`.
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.name = "base"
  config.shape = (24, 384, 384)
  config.train_slices = (5, 11, 17)
  config.eval_slices = (20,)
  config.steps = 300
  config.batch_size = 8
  config.patch = 128
  config.val_block = 128
  config.eval_every = 100
  config.warmup_steps = 30
  config.unet_depth = 4
  config.unet_features = (16, 16, 32, 64, 128, 16)
  config.sensor3d_depth = 3
  config.sensor3d_features = (8, 16, 32, 64)
  config.workers = 2
  config.tile = 256
  config.overlap = 32
  config.infer_batch = 4
  config.seeds = (0,)
  config.spread_seeds = (0, 1, 2)
  # The rows of the multi-slice finding, which get `spread_seeds`.
  config.spread_rows = ("unet_1_ice_tld", "unet_3_ice_tld")
  config.forest = ml_collections.ConfigDict()
  config.cleaning = ml_collections.ConfigDict()
  config.sweep_levels = (0.0, 0.5, 1.0, 2.0)
  config.sweep_seeds = (0,)
  config.sweep_network = ("unet", 3, ("ICE", "TLD"))
  return config
