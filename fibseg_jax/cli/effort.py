r"""The annotation-effort curve: how much labelling buys how much accuracy.

  fibseg effort --out=effort/ [--budget=quick] [--seeds=0,1,2]
  fibseg effort --out=effort_real/ --volume=vol.zarr --train_slices=4,8,12 \
    --eval_slices=16 --levels=strokes:0.02,slices:1,slices:3

For every --levels entry and seed, the truth of --volume is cut down to what a user would
have painted: strokes:F (brush strokes, 3 pixels wide, along the middle of each class's
regions, over a share F of each training slice, drawn anew per seed), slices:N (N whole
slices, the training slices first) or every:N (every Nth slice with truth, whole). A
U-Net of the budget and the random forest on multiscale features are trained on it and
scored on --eval_slices of the full truth: effort.json, effort.md (mean +- std over seeds,
the paired U-Net - forest difference) and effort.png (mean IoU against labelled pixels).
Without --volume the budget's synthetic stack is generated in --out, labelled on every
slice (only the level's labels are ever trained on). Reruns resume.
"""

import os
import sys

from absl import flags

from fibseg_jax import study
from fibseg_jax.cli import runner, stack_flags
from fibseg_jax.data import volume as volume_lib
from fibseg_jax.study import effort

_LEVELS = flags.DEFINE_list(
  "levels", list(effort.DEFAULT_LEVELS), "Annotation levels: strokes:F, slices:N, every:N."
)
_METHODS = flags.DEFINE_list(
  "methods",
  list(effort.METHODS),
  "Of: network (the U-Net), forest (the random forest), taught (the U-Net taught by the "
  "forest: --config.distill.teacher=forest).",
)


def main(argv):
  runner.begin(argv, required={"out": "effort/"})
  out = stack_flags.OUT.value
  try:
    effort.claim_directory(out, stack_flags.VOLUME.value)
  except ValueError as e:
    sys.exit(f"error: {e}")
  study.cache_compilations(out)
  log = lambda line: print(line, flush=True)  # noqa: E731
  try:
    budget = stack_flags.budget()
    common = stack_flags.stack(budget, annotate=range(budget.shape[0]))
    document = effort.run_effort(
      out, budget, levels=_LEVELS.value, methods=_METHODS.value, log=log, **common
    )
  except (ValueError, volume_lib.VolumeError) as e:  # user mistakes
    sys.exit(f"error: {e}")
  print(open(os.path.join(out, "effort.md")).read())
  print(f"wrote {out}/effort.json, effort.md, effort.png ({len(document['rows'])} levels)")


def run(argv: list[str] | None = None) -> None:
  """`fibseg effort`: `main` under absl (see `runner.run_module`)."""
  runner.run_module(sys.modules[__name__], argv)
