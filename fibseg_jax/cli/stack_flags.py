"""The flags of the studies that train U-Nets on one stack with seeds (ablation,
semi-study, distill-study): where, on what, how long, and the stack's slices.

absl flags are global; only one subcommand module is imported per process
(`cli.main`), and each that imports this one shares its definitions.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence

from absl import flags

from fibseg_jax import study
from fibseg_jax.data import volume as volume_lib
from fibseg_jax.train import config as config_lib

OUT = flags.DEFINE_string("out", None, "Output directory (created; resumed if it exists).")
BUDGET = flags.DEFINE_string("budget", "quick", study.BUDGET_FLAG_HELP)
VOLUME = flags.DEFINE_string("volume", None, "Volume; default a synthetic stack in --out.")
TRAIN = flags.DEFINE_string("train_slices", None, "Slices to train on; default the budget's.")
EVAL = flags.DEFINE_string("eval_slices", None, "Slices to score on; default the budget's.")
CHANNELS = flags.DEFINE_list("channels", None, "Input channels; default all of the volume's.")
SLICES = flags.DEFINE_integer("slices", 3, "Slab depth of the U-Net.")
SEEDS = flags.DEFINE_string("seeds", "0,1,2", "Training seeds.")
STEPS = flags.DEFINE_integer("steps", None, "Training steps instead of the budget's.")


def budget() -> study.Budget:
  """--budget, with --steps (and validation every as many steps in proportion)."""
  chosen = study.get_budget(BUDGET.value)
  if STEPS.value:
    every = max(1, STEPS.value * chosen.eval_every // chosen.steps)
    chosen = dataclasses.replace(chosen, steps=STEPS.value, eval_every=every)
  return chosen


def stack(chosen: study.Budget, annotate: Sequence[int] | None = None, **severities: float) -> dict:
  """volume, channels, slices, seeds, train_slices and eval_slices of the flags.

  Without --volume, the budget's synthetic stack is generated in --out/volume.zarr
  (labelled on `annotate`, default the budget's slices; `severities` as
  `synth.SynthConfig`'s, e.g. drift=1).
  """
  volume = VOLUME.value
  if not volume:
    volume = os.path.join(OUT.value, "volume.zarr")
    extra = {} if annotate is None else {"annotate": annotate}
    study.synthetic_volume(volume, chosen, **extra, **severities)
  vol = volume_lib.open_volume(volume)
  return {
    "volume": volume,
    "channels": tuple(CHANNELS.value or vol.channels),
    "slices": SLICES.value,
    "seeds": config_lib.parse_ints(SEEDS.value, "--seeds"),
    "train_slices": config_lib.parse_ints(TRAIN.value or chosen.train_slices, "--train_slices"),
    "eval_slices": config_lib.parse_ints(EVAL.value or chosen.eval_slices, "--eval_slices"),
  }
