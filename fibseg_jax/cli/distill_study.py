r"""Distil the seed ensemble into one fast network, measured (`fibseg_jax.study.distill`).

  fibseg distill-study --out=distill/ [--budget=quick] [--seeds=0,1,2]
  fibseg distill-study --out=distill_real/ --volume=vol.zarr --train_slices=4,8,12 \
    --eval_slices=16 [--teacher_tta=off]

Rows: supervised (the budget's U-Net, one per seed), teacher (those seeds as an
ensemble, with --teacher_tta test-time augmentation), distilled (a U-Net of the same
widths trained on the labels and the teacher's probabilities over the whole stack) and
distilled_narrow (half the widths). Each is scored on --eval_slices of a segmentation of
the whole stack, which also gives its Mpixel/s on this machine; mean +- std over seeds
and the paired difference to supervised. Writes distill.json and distill.md; reruns
resume, and an --out holds one setting. Default volume: the budget's synthetic stack in
OUT/volume.zarr.
"""

import os
import sys

from absl import flags

from fibseg_jax import study
from fibseg_jax.cli import runner, stack_flags
from fibseg_jax.data import volume as volume_lib
from fibseg_jax.study import distill

_TEACHER_TTA = flags.DEFINE_string(
  "teacher_tta", "all", "Test-time augmentation of the teacher's predictions (segment --tta)."
)
_ROWS = flags.DEFINE_list("rows", list(distill.ROWS), f"Rows, of: {', '.join(distill.ROWS)}.")


def main(argv):
  runner.begin(argv, required={"out": "distill/"})
  out = stack_flags.OUT.value
  try:
    distill.claim_directory(out, stack_flags.VOLUME.value)
    study.cache_compilations(out)
    budget = stack_flags.budget()
    distill.run_distill_study(
      out,
      budget,
      **stack_flags.stack(budget),
      teacher_tta=_TEACHER_TTA.value,
      row_names=_ROWS.value,
      log=lambda line: print(line, flush=True),
    )
  except (ValueError, volume_lib.VolumeError) as e:  # user mistakes (ConfigError included)
    sys.exit(f"error: {e}")
  print(open(os.path.join(out, "distill.md")).read())
  print(f"wrote {out}/distill.json")


def run(argv: list[str] | None = None) -> None:
  """`fibseg distill-study`: `main` under absl (see `runner.run_module`)."""
  runner.run_module(sys.modules[__name__], argv)
