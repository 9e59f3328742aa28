r"""Trains a segmentation model on a volume's annotated slices.

  fibseg train --config=sensor3d \
    --workdir=runs/s3d --config.data.path=vol.zarr --config.data.channels=ICE,TLD \
    --config.data.slices=3 --config.data.patch=192 --config.train.batch_size=8 \
    --config.train.steps=2000

  fibseg train --config=unet --show_config

  # Distil a seed ensemble (its TTA probabilities over the whole stack, computed once
  # into WORKDIR/teacher/) into one narrower, faster network:
  fibseg train --config=unet --workdir=runs/student --config.data.path=vol.zarr \
    --config.distill.teacher=runs/s0,runs/s1,runs/s2 --config.model.features='(8,8,16,32,64,8)'

--show_config prints every config field (--config.FIELD=VALUE sets one) with its value,
the config file's where a flag overrides it, and one line of help, then exits.
Restarting with the same --workdir resumes from its latest checkpoint. Multi-host:
add --coordinator_address=HOST:PORT --num_processes=N --process_id=I on every host
(SLURM, Open MPI and Cloud TPU are detected without flags).
"""

import sys

from absl import flags, logging
from ml_collections import config_flags

from fibseg_jax.cli import config_args, runner
from fibseg_jax.infer import distill
from fibseg_jax.train import config as config_lib
from fibseg_jax.train import loop, parallel

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints and metrics.")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None, "host:port of process 0.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Number of processes.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "Index of this process.")
_PROGRESS = flags.DEFINE_bool("progress", True, "Show a progress bar.")
_SHOW_CONFIG = flags.DEFINE_bool(
  "show_config",
  False,
  "Print every field of --config (with the --config.FIELD=VALUE overrides), its value and "
  "one line of help, then exit.",
)


def main(argv):
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)  # orbax logs every file it writes at INFO
  if len(argv) > 1:
    sys.exit(f"error: unexpected arguments {argv[1:]}")
  if _CONFIG.value is None:
    sys.exit("error: --config is required, e.g. --config=unet")
  if _SHOW_CONFIG.value:
    defaults = config_args.load_config(config_flags.get_config_filename(flags.FLAGS["config"]))
    print(config_args.describe(_CONFIG.value, defaults))
    return
  if not _WORKDIR.value:
    sys.exit("error: --workdir is required, e.g. --workdir=runs/unet")
  try:
    parallel.initialize_distributed(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
    distill.prepare_teacher(_CONFIG.value, _WORKDIR.value, progress=_PROGRESS.value)
    loop.train_and_evaluate(_CONFIG.value, _WORKDIR.value, progress=_PROGRESS.value)
  except config_lib.ConfigError as e:  # user mistakes: flags, config, data, workdir
    sys.exit(f"error: {e}")  # anything else is a bug and keeps its traceback


def run(argv: list[str] | None = None) -> None:
  """`fibseg train`: `main` under absl (see `runner.run_module`)."""
  argv = list(sys.argv if argv is None else argv)
  argv = argv[:1] + config_args.resolve(argv[1:])  # --config=unet: the packaged file
  try:
    config_args.check_args(argv[1:])  # before ml_collections answers with a traceback
  except config_args.ConfigArgError as e:
    runner.usage_error(str(e))
  runner.run_module(sys.modules[__name__], argv)
