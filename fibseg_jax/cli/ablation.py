r"""The training recipe, part by part, with seeds (`fibseg_jax.study.ablation`).

  fibseg ablation --out=ablation/ [--budget=quick] [--seeds=0,1,2]
  fibseg ablation --out=ablation_real/ --volume=vol.zarr --train_slices=4,8,12 \
    --eval_slices=16 [--rows=baseline,full] [--steps=1000]

Rows: the baseline (the first recipe), full (every augmentation and sampling part on)
and + each part alone (spatial, intensity, artifacts, deep_supervision, rare_class,
sgd_poly). Every row is the same U-Net on the same slices, split and step budget, scored
on --eval_slices without test-time augmentation; mean +- std over seeds and the paired
difference to the baseline of the same seed. Writes ablation.json and ablation.md;
rerunning resumes (finished runs are kept), and an --out holds one setting (other
--steps, slices or volume are refused: use another --out). Default volume: the
synthetic stack of the budget, generated in OUT/volume.zarr.
"""

import dataclasses
import os
import sys

from absl import flags

from fibseg_jax import study
from fibseg_jax.cli import runner
from fibseg_jax.data import volume as volume_lib
from fibseg_jax.study import ablation
from fibseg_jax.train import config as config_lib

_OUT = flags.DEFINE_string("out", None, "Output directory (created; resumed if it exists).")
_BUDGET = flags.DEFINE_string("budget", "quick", study.BUDGET_FLAG_HELP)
_VOLUME = flags.DEFINE_string("volume", None, "Volume; default a synthetic stack in --out.")
_TRAIN = flags.DEFINE_string("train_slices", None, "Slices to train on; default the budget's.")
_EVAL = flags.DEFINE_string("eval_slices", None, "Slices to score on; default the budget's.")
_CHANNELS = flags.DEFINE_list("channels", None, "Input channels; default all of the volume's.")
_SLICES = flags.DEFINE_integer("slices", 3, "Slab depth of the U-Net.")
_SEEDS = flags.DEFINE_string("seeds", "0,1,2", "Training seeds.")
_STEPS = flags.DEFINE_integer("steps", None, "Training steps instead of the budget's.")
_FINISHED = flags.DEFINE_bool(
  "finished_only", False, "Train nothing: rewrite the table from the finished runs."
)
_ROWS = flags.DEFINE_list("rows", None, f"Only these rows, of: {', '.join(ablation.rows())}.")


def main(argv):
  runner.begin(argv, required={"out": "ablation/"})
  try:
    ablation.claim_directory(_OUT.value, _VOLUME.value)
    study.cache_compilations(_OUT.value)
    budget = study.get_budget(_BUDGET.value)
    if _STEPS.value:
      every = max(1, _STEPS.value * budget.eval_every // budget.steps)
      budget = dataclasses.replace(budget, steps=_STEPS.value, eval_every=every)
    volume = _VOLUME.value
    if not volume:
      volume = os.path.join(_OUT.value, "volume.zarr")
      study.synthetic_volume(volume, budget)
    vol = volume_lib.open_volume(volume)
    document = ablation.run_ablation(
      _OUT.value,
      budget,
      volume=volume,
      channels=tuple(_CHANNELS.value or vol.channels),
      slices=_SLICES.value,
      seeds=config_lib.parse_ints(_SEEDS.value, "--seeds"),
      train_slices=config_lib.parse_ints(_TRAIN.value or budget.train_slices, "--train_slices"),
      eval_slices=config_lib.parse_ints(_EVAL.value or budget.eval_slices, "--eval_slices"),
      row_names=_ROWS.value,
      finished_only=_FINISHED.value,
      log=lambda line: print(line, flush=True),
    )
  except (ValueError, volume_lib.VolumeError) as e:  # user mistakes
    sys.exit(f"error: {e}")
  print(ablation.markdown(document))
  print(f"wrote {_OUT.value}/ablation.json ({len(document['rows'])} rows)")


def run(argv: list[str] | None = None) -> None:
  """`fibseg ablation`: `main` under absl (see `runner.run_module`)."""
  runner.run_module(sys.modules[__name__], argv)
