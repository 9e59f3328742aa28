r"""Trains a segmentation model on a volume's annotated slices.

  python experiments/train.py --config=experiments/configs/sensor3d.py \
    --workdir=runs/s3d --config.data.path=vol.zarr --config.data.channels=ICE,TLD \
    --config.data.slices=3 --config.data.patch=192 --config.train.batch_size=8 \
    --config.train.steps=2000

Restarting with the same --workdir resumes from its latest checkpoint. Multi-host:
add --coordinator_address=HOST:PORT --num_processes=N --process_id=I on every host
(SLURM, Open MPI and Cloud TPU are detected without flags).
"""

import sys

from absl import app, flags, logging
from ml_collections import config_flags

from fibseg_jax.train import config as config_lib
from fibseg_jax.train import loop, parallel

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints and metrics.")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None, "host:port of process 0.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Number of processes.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "Index of this process.")
_PROGRESS = flags.DEFINE_bool("progress", True, "Show a progress bar.")


def main(argv):
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)  # orbax logs every file it writes at INFO
  if len(argv) > 1:
    sys.exit(f"error: unexpected arguments {argv[1:]}")
  if _CONFIG.value is None:
    sys.exit("error: --config is required, e.g. --config=experiments/configs/unet.py")
  if not _WORKDIR.value:
    sys.exit("error: --workdir is required, e.g. --workdir=runs/unet")
  try:
    parallel.initialize_distributed(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
    loop.train_and_evaluate(_CONFIG.value, _WORKDIR.value, progress=_PROGRESS.value)
  except config_lib.ConfigError as e:  # user mistakes: flags, config, data, workdir
    sys.exit(f"error: {e}")  # anything else is a bug and keeps its traceback


if __name__ == "__main__":
  app.run(main)
