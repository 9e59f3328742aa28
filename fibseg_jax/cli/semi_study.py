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

import os
import sys

from absl import flags

from fibseg_jax import study
from fibseg_jax.cli import runner, stack_flags
from fibseg_jax.data import volume as volume_lib
from fibseg_jax.study import semi as semi_lib

_WEIGHT = flags.DEFINE_float("semi_weight", 1.0, "--config.semi.weight of the semi rows.")
_MODE = flags.DEFINE_enum("semi_mode", "pseudo", ["pseudo", "soft"], "--config.semi.mode.")
_THRESHOLD = flags.DEFINE_float("semi_threshold", 0.9, "--config.semi.threshold.")
_EMA = flags.DEFINE_float("semi_ema", 0.99, "--config.semi.ema.")
_SUGGEST = flags.DEFINE_bool("suggest", False, "Also run the top-ranked vs random slice test.")


def main(argv):
  runner.begin(argv, required={"out": "semi/"})
  try:
    semi_lib.claim_directory(stack_flags.OUT.value, stack_flags.VOLUME.value)
  except ValueError as e:
    sys.exit(f"error: {e}")
  study.cache_compilations(stack_flags.OUT.value)
  log = lambda line: print(line, flush=True)  # noqa: E731
  out = stack_flags.OUT.value
  try:
    budget = stack_flags.budget()
    # Every slice labelled (only training slices' labels are read in training).
    common = {**stack_flags.stack(budget, annotate=range(budget.shape[0])), "log": log}
    seeds = common["seeds"]
    semi = {
      "weight": _WEIGHT.value,
      "mode": _MODE.value,
      "threshold": _THRESHOLD.value,
      "ema": _EMA.value,
    }
    document = study.run_fourway(out, budget, semi=semi, **common)
    print(open(os.path.join(out, "fourway.md")).read())
    if _SUGGEST.value:
      supervised = {s: os.path.join(out, f"supervised_s{s}", "run") for s in seeds}
      doc = study.run_suggestion(
        os.path.join(out, "suggest"), budget, supervised=supervised, **common
      )
      log(f"top-ranked slice: {doc['top']}; random slice: {doc['random']}")
  except (ValueError, volume_lib.VolumeError) as e:  # user mistakes
    sys.exit(f"error: {e}")
  print(f"wrote {out}/fourway.json ({len(document['rows'])} rows)")


def run(argv: list[str] | None = None) -> None:
  """`fibseg semi-study`: `main` under absl (see `runner.run_module`)."""
  runner.run_module(sys.modules[__name__], argv)
