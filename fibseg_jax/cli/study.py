r"""The paper's comparison in one command: networks, cleaned inputs, classical routes.

  fibseg study --out=study/ [--budget=quick|paper]
  fibseg study --out=study/ --volume=vol.zarr --train_slices=5,11,17 \
    --eval_slices=20

Default volume: a generated synthetic stack with every artifact at its default
(`out/volume.zarr`). Rows: U-Net on 1 and 3 slices and Sensor-3D on 3 slices, each fed
each channel alone and all together; the best of those retrained on a cleaned copy of
the volume; multi-Otsu, cleaning + multi-Otsu and a random forest. Writes study.json,
study.md and study.png to --out, with one progress line per row. Rerunning the same
command resumes: finished runs are not recomputed. --budget=quick fits 60 minutes on 2
CPU cores; paper is for an accelerator; smoke checks the pipeline on a tiny stack. Compiled
steps are cached in OUT/.jax_cache (or $JAX_COMPILATION_CACHE_DIR).
--rows=PATTERN,... runs only matching rows (e.g. --rows='unet_3_*,forest,cleaned').
Peer rows (fibseg_jax/study/peers.py) run by default when the `peers` extra is installed
(`pip install -e '.[peers]'`): monai_basicunet and nnunetv2_2d_small (nnU-Net's planner,
patch capped at the budget's); nnunetv2_2d (nnU-Net's own plan) only when --rows names it.
"""

import sys

from absl import flags

from fibseg_jax import study
from fibseg_jax.cli import runner
from fibseg_jax.train import config as config_lib

_OUT = flags.DEFINE_string("out", None, "Output directory (created; resumed if it exists).")
_BUDGET = flags.DEFINE_string("budget", "quick", study.BUDGET_FLAG_HELP)
_VOLUME = flags.DEFINE_string("volume", None, "Volume to study; default a synthetic stack.")
_TRAIN = flags.DEFINE_string(
  "train_slices", None, "Annotated slices to train on, e.g. 5,11,17 (default: all but eval)."
)
_EVAL = flags.DEFINE_string("eval_slices", None, "Annotated slices to score on, e.g. 20.")
_ROWS = flags.DEFINE_list("rows", None, "Only the rows matching these fnmatch patterns.")


def main(argv):
  runner.begin(argv, required={"out": "study/"})
  study.cache_compilations(_OUT.value)
  try:
    train = config_lib.parse_ints(_TRAIN.value, "--train_slices") if _TRAIN.value else None
    evaluate = config_lib.parse_ints(_EVAL.value, "--eval_slices") if _EVAL.value else None
    document = study.run_study(
      _OUT.value,
      study.get_budget(_BUDGET.value),
      volume=_VOLUME.value,
      train_slices=train,
      eval_slices=evaluate,
      rows=_ROWS.value,
      log=lambda line: print(line, flush=True),
    )
  except ValueError as e:  # user mistakes: flags, volume, output directory
    sys.exit(f"error: {e}")
  print(f"wrote {_OUT.value}/study.json, study.md, study.png ({len(document['rows'])} rows)")


def run(argv: list[str] | None = None) -> None:
  """`fibseg study`: `main` under absl (see `runner.run_module`)."""
  runner.run_module(sys.modules[__name__], argv)
