"""Budgets of the study and the artifact sweep: what is run, how long, on what stack.

A budget fixes everything that sets the cost: the default synthetic stack, the step
budget and widths of the networks, the tiling of inference, the seeds and the sweep's
severity levels. Every network row of a study gets the same step budget.

  quick  2 CPU cores, 60 minutes for the study and 60 for the sweep (see BUILD_NOTES.md
         for the measured step times it was set from; retune `QUICK` after measuring).
  paper  an accelerator: the networks at their default widths, 3 seeds everywhere.
  smoke  a tiny stack and a few steps, to check the whole pipeline in a minute (tests).
"""

from __future__ import annotations

import dataclasses
from typing import Any

from fibseg_jax.baselines import CleaningConfig, ForestConfig


@dataclasses.dataclass(frozen=True)
class Budget:
  """What a study or sweep run costs.

  Attributes:
    name: "quick", "paper" or "smoke".
    shape: (z, y, x) of the default synthetic stack.
    train_slices: annotated slices trained on (25% of their area held out).
    eval_slices: annotated slices scored on, never trained on.
    steps: training steps of every network.
    batch_size: patches per step.
    patch: y-x side of a training patch.
    val_block: side of the validation blocks.
    eval_every: validation (and checkpoint) every N steps.
    warmup_steps: learning-rate warmup.
    unet_depth, unet_features: U-Net size (features: depth + 1 or depth + 2 widths).
    sensor3d_depth, sensor3d_features: Sensor-3D size.
    workers: loader threads.
    tile, overlap, infer_batch: whole-stack inference tiling.
    seeds: training seeds of every network row.
    spread_seeds: seeds of the rows in `spread_rows` (the multi-slice finding's spread).
    spread_rows: row names that get `spread_seeds`.
    forest: features and forest of the random-forest route.
    cleaning: the cleaning of route (b) and of the cleaned-input network.
    sweep_levels: severities (x the default) of each artifact in the sweep.
    sweep_seeds: seeds of the sweep's network and forest.
    sweep_network: (architecture, slab slices, channels) of the sweep's network when no
      finished study names the best one.
  """

  name: str
  shape: tuple[int, int, int]
  train_slices: tuple[int, ...]
  eval_slices: tuple[int, ...]
  steps: int
  batch_size: int
  patch: int
  val_block: int
  eval_every: int
  warmup_steps: int
  unet_depth: int
  unet_features: tuple[int, ...]
  sensor3d_depth: int
  sensor3d_features: tuple[int, ...]
  workers: int
  tile: int
  overlap: int
  infer_batch: int
  seeds: tuple[int, ...]
  spread_seeds: tuple[int, ...]
  spread_rows: tuple[str, ...]
  forest: ForestConfig
  cleaning: CleaningConfig
  sweep_levels: tuple[float, ...]
  sweep_seeds: tuple[int, ...]
  sweep_network: tuple[str, int, tuple[str, ...]] = ("unet", 3, ("ICE", "TLD"))

  def model(self, architecture: str) -> dict[str, Any]:
    """Model-config overrides of an architecture ("unet" or "sensor3d")."""
    if architecture == "unet":
      return {"depth": self.unet_depth, "features": tuple(self.unet_features)}
    if architecture == "sensor3d":
      return {"depth": self.sensor3d_depth, "features": tuple(self.sensor3d_features)}
    raise ValueError(f"no network architecture {architecture!r}; expected unet or sensor3d")

  def to_json(self) -> dict[str, Any]:
    out = dataclasses.asdict(self)
    out["forest"] = self.forest.to_json()
    out["cleaning"] = self.cleaning.to_json()
    return _lists(out)


def _lists(value: Any) -> Any:
  """Tuples to lists, recursively, so a budget compares equal to its JSON round trip."""
  if isinstance(value, dict):
    return {k: _lists(v) for k, v in value.items()}
  if isinstance(value, list | tuple):
    return [_lists(v) for v in value]
  return value


SPREAD_ROWS = ("unet_1_ice_tld", "unet_3_ice_tld")

# 2 CPU cores. A U-Net at half the BasicUNet widths, patch 128, batch 8, 300 steps (the
# setting of the earlier partial comparison); Sensor-3D at half its default widths. Set
# from a measured U-Net row (BUILD_NOTES.md, "Study and sweep"); `steps` is the knob.
QUICK = Budget(
  name="quick",
  shape=(24, 384, 384),
  train_slices=(5, 11, 17),
  eval_slices=(20,),
  steps=300,
  batch_size=8,
  patch=128,
  val_block=128,
  eval_every=100,
  warmup_steps=30,
  unet_depth=4,
  unet_features=(16, 16, 32, 64, 128, 16),
  sensor3d_depth=3,
  sensor3d_features=(8, 16, 32, 64),
  workers=2,
  tile=256,
  overlap=32,
  infer_batch=4,
  seeds=(0,),
  spread_seeds=(0, 1, 2),
  spread_rows=SPREAD_ROWS,
  forest=ForestConfig(),
  cleaning=CleaningConfig(),
  sweep_levels=(0.0, 0.5, 1.0, 2.0),
  sweep_seeds=(0,),
)

# An accelerator: default widths (BasicUNet, Sensor-3D), the README's training setting.
PAPER = Budget(
  name="paper",
  shape=(24, 1024, 1024),
  train_slices=(5, 11, 17),
  eval_slices=(20,),
  steps=2000,
  batch_size=8,
  patch=192,
  val_block=128,
  eval_every=200,
  warmup_steps=100,
  unet_depth=4,
  unet_features=(32, 32, 64, 128, 256, 32),
  sensor3d_depth=3,
  sensor3d_features=(16, 32, 64, 128),
  workers=4,
  tile=512,
  overlap=64,
  infer_batch=8,
  seeds=(0, 1, 2),
  spread_seeds=(0, 1, 2),
  spread_rows=SPREAD_ROWS,
  forest=ForestConfig(n_estimators=100),
  cleaning=CleaningConfig(),
  sweep_levels=(0.0, 0.5, 1.0, 1.5, 2.0),
  sweep_seeds=(0, 1, 2),
)

# The whole pipeline on a tiny stack in about a minute; numbers mean nothing.
SMOKE = Budget(
  name="smoke",
  shape=(12, 64, 64),
  train_slices=(3, 5, 7),
  eval_slices=(9,),
  steps=2,
  batch_size=2,
  patch=32,
  val_block=32,
  eval_every=2,
  warmup_steps=1,
  unet_depth=1,
  unet_features=(4, 8),
  sensor3d_depth=1,
  sensor3d_features=(4, 8),
  workers=1,
  tile=64,
  overlap=16,
  infer_batch=2,
  seeds=(0,),
  spread_seeds=(0, 1),
  spread_rows=SPREAD_ROWS,
  forest=ForestConfig(n_estimators=4, samples_per_class=200, sigma_max=4.0, tile=64),
  cleaning=CleaningConfig(levels=2, patch_distance=2),
  sweep_levels=(0.0, 1.0),
  sweep_seeds=(0,),
)

BUDGETS = {b.name: b for b in (QUICK, PAPER, SMOKE)}


def get(name: str) -> Budget:
  """The budget called `name`, with an error that names --budget."""
  if name not in BUDGETS:
    raise ValueError(f"--budget={name}: expected one of {', '.join(BUDGETS)}")
  return BUDGETS[name]
