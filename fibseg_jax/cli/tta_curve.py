r"""Held-out mean IoU and cost against the number of TTA passes (`fibseg_jax.study.tta`).

  fibseg tta-curve --workdir=runs/syn/unet_s0 --workdir=runs/syn/unet_s1 \
    --workdir=runs/syn/unet_s2 --volume=runs/syn/vol.zarr --eval_slices=20 \
    --out=tta_curve/ [--passes=1,2,4,8,16]

Segments only --eval_slices with each pass count and each network, scores them against
the volume's labels there and times each count (cold segmentation and warm forward
pass). Writes OUT/curve.json and OUT/curve.md; mean +- std over the networks.
"""

import os
import sys

from absl import flags, logging

from fibseg_jax import checkpoint, infer
from fibseg_jax.cli import runner
from fibseg_jax.data import volume as volume_lib
from fibseg_jax.eval import report
from fibseg_jax.study import tta

_WORKDIR = flags.DEFINE_multi_string("workdir", None, "Trained network (give one per seed).")
_VOLUME = flags.DEFINE_string("volume", None, "Volume with labels on --eval_slices.")
_EVAL = flags.DEFINE_string("eval_slices", None, "Held-out slices scored, e.g. 20 or 18-20.")
_PASSES = flags.DEFINE_list("passes", [str(k) for k in tta.PASSES], "Pass counts measured.")
_OUT = flags.DEFINE_string("out", None, "Directory for the segmentations and curve.json/.md.")


def main(argv):
  if len(argv) > 1:
    sys.exit(f"error: unexpected arguments {argv[1:]}")
  for flag, example in (
    (_WORKDIR, "runs/s0"),
    (_VOLUME, "vol.zarr"),
    (_EVAL, "20"),
    (_OUT, "tta/"),
  ):
    if not flag.value:
      sys.exit(f"error: --{flag.name} is required, e.g. --{flag.name}={example}")
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.ERROR)
  for workdir in _WORKDIR.value:
    if not os.path.exists(workdir):
      sys.exit(f"error: --workdir={workdir}: no such directory")
  try:
    eval_slices = report.parse_slices(_EVAL.value, flag="--eval_slices")
    passes = [infer.settings.parse_tta(k) for k in _PASSES.value]
    document = tta.passes_curve(_WORKDIR.value, _VOLUME.value, eval_slices, passes, out=_OUT.value)
  except infer.InferenceError as e:
    sys.exit(f"error: {str(e).replace('--tta=', '--passes=')}")
  except (ValueError, volume_lib.VolumeError, checkpoint.CheckpointError) as e:
    sys.exit(f"error: {e}")
  table = tta.markdown(document)
  with open(os.path.join(_OUT.value, "curve.md"), "w") as f:
    f.write(table)
  print(table)
  print(f"wrote {_OUT.value}/curve.json and curve.md")


def run(argv: list[str] | None = None) -> None:
  """`fibseg tta-curve`: `main` under absl (see `runner.run_module`)."""
  runner.run_module(sys.modules[__name__], argv)
