r"""Does learning from the unannotated slices help? The four-way table and slice choice.

  fibseg semi-study --out=semi/ [--budget=quick] [--seeds=0,1,2] [--suggest]
  fibseg semi-study --out=semi_real/ --volume=vol.zarr --train_slices=4,8,12 \
    --eval_slices=16

For every seed, a U-Net trained on the annotated slices alone and one trained with the
semi-supervised objective (--semi_* flags, as --config.semi.*) on the same step budget;
each is scored on --eval_slices without and with test-time augmentation: rows
supervised / + semi / + TTA / + both, mean and std over seeds (fourway.json, .md).
--suggest also adds, for every seed, the slice the supervised model is least sure of as a
fourth annotated slice, against a random one (suggestion.json); it needs labels on the
candidate slices, which the default synthetic stack (out/volume.zarr, every slice
labelled; only training slices' labels are read in training) has. Reruns resume; an
--out holds one setting (other --semi_*, --steps or slices are refused: use another
--out). The unlabelled patches come from every slice, the scored ones included (their
images, never their labels), as they would for a user segmenting the stack.
"""

import dataclasses
import os
import sys

from absl import flags

from fibseg_jax import study
from fibseg_jax.cli import runner
from fibseg_jax.data import volume as volume_lib
from fibseg_jax.study import semi as semi_lib
from fibseg_jax.train import config as config_lib

_OUT = flags.DEFINE_string("out", None, "Output directory (created; resumed if it exists).")
_BUDGET = flags.DEFINE_string("budget", "quick", study.BUDGET_FLAG_HELP)
_VOLUME = flags.DEFINE_string("volume", None, "Volume; default a synthetic stack in --out.")
_TRAIN = flags.DEFINE_string("train_slices", None, "Slices to train on; default the budget's.")
_EVAL = flags.DEFINE_string("eval_slices", None, "Slices to score on; default the budget's.")
_CHANNELS = flags.DEFINE_list("channels", None, "Input channels; default all of the volume's.")
_SLICES = flags.DEFINE_integer("slices", 3, "Slab depth of the U-Net.")
_SEEDS = flags.DEFINE_string("seeds", "0,1,2", "Training seeds.")
_WEIGHT = flags.DEFINE_float("semi_weight", 1.0, "--config.semi.weight of the semi rows.")
_MODE = flags.DEFINE_enum("semi_mode", "pseudo", ["pseudo", "soft"], "--config.semi.mode.")
_THRESHOLD = flags.DEFINE_float("semi_threshold", 0.9, "--config.semi.threshold.")
_EMA = flags.DEFINE_float("semi_ema", 0.99, "--config.semi.ema.")
_STEPS = flags.DEFINE_integer("steps", None, "Training steps instead of the budget's.")
_SUGGEST = flags.DEFINE_bool("suggest", False, "Also run the top-ranked vs random slice test.")


def _volume(budget: study.Budget) -> str:
  if _VOLUME.value:
    return _VOLUME.value
  path = os.path.join(_OUT.value, "volume.zarr")
  study.synthetic_volume(path, budget, annotate=range(budget.shape[0]))  # every slice labelled
  return path


def main(argv):
  runner.begin(argv, required={"out": "semi/"})
  try:
    semi_lib.claim_directory(_OUT.value, _VOLUME.value)
  except ValueError as e:
    sys.exit(f"error: {e}")
  study.cache_compilations(_OUT.value)
  try:
    budget = study.get_budget(_BUDGET.value)
  except ValueError as e:
    sys.exit(f"error: {e}")
  if _STEPS.value:
    every = max(1, _STEPS.value * budget.eval_every // budget.steps)
    budget = dataclasses.replace(budget, steps=_STEPS.value, eval_every=every)
  log = lambda line: print(line, flush=True)  # noqa: E731
  try:
    volume = _volume(budget)
    vol = volume_lib.open_volume(volume)
    train = config_lib.parse_ints(_TRAIN.value or budget.train_slices, "--train_slices")
    evaluate = config_lib.parse_ints(_EVAL.value or budget.eval_slices, "--eval_slices")
    seeds = config_lib.parse_ints(_SEEDS.value, "--seeds")
    channels = tuple(_CHANNELS.value or vol.channels)
    common = dict(
      volume=volume,
      channels=channels,
      slices=_SLICES.value,
      seeds=seeds,
      train_slices=train,
      eval_slices=evaluate,
      log=log,
    )
    semi = {
      "weight": _WEIGHT.value,
      "mode": _MODE.value,
      "threshold": _THRESHOLD.value,
      "ema": _EMA.value,
    }
    document = study.run_fourway(_OUT.value, budget, semi=semi, **common)
    print(open(os.path.join(_OUT.value, "fourway.md")).read())
    if _SUGGEST.value:
      supervised = {s: os.path.join(_OUT.value, f"supervised_s{s}", "run") for s in seeds}
      doc = study.run_suggestion(
        os.path.join(_OUT.value, "suggest"), budget, supervised=supervised, **common
      )
      log(f"top-ranked slice: {doc['top']}; random slice: {doc['random']}")
  except (ValueError, volume_lib.VolumeError) as e:  # user mistakes
    sys.exit(f"error: {e}")
  print(f"wrote {_OUT.value}/fourway.json ({len(document['rows'])} rows)")


def run(argv: list[str] | None = None) -> None:
  """`fibseg semi-study`: `main` under absl (see `runner.run_module`)."""
  runner.run_module(sys.modules[__name__], argv)
