"""The experiment config shared by every model: data, model and training fields.

Experiment files under experiments/configs/ start from `base_config()` and fill in
`config.model`. The names here are part of the command-line interface
(`--config.data.channels=ICE,TLD`, `--config.train.batch_size=8`, ...), and the whole
config is saved with every checkpoint so a checkpoint alone rebuilds its model.
"""

from __future__ import annotations

import ml_collections


class ConfigError(ValueError):
  """A user mistake in the experiment config, its flags or its workdir.

  The message names the flag and the expected value. Experiment scripts print it as one
  line; any other exception is a bug and keeps its traceback.
  """


def base_config() -> ml_collections.ConfigDict:
  """Defaults of the paper's setting: three annotated slices, 25% held out."""
  config = ml_collections.ConfigDict()

  config.data = ml_collections.ConfigDict()
  config.data.path = ""  # volume written by experiments/ingest.py or make_synthetic.py
  config.data.channels = "ICE,TLD"  # comma-separated channel names of the volume
  config.data.slices = 3  # odd: the annotated slice and (slices - 1) / 2 either side
  config.data.patch = 192  # y-x side of a training patch
  config.data.val_fraction = 0.25  # of the annotated area, in square blocks
  config.data.val_block = 128  # side of a validation block in pixels
  config.data.split_seed = 0  # seed of the validation split, independent of train.seed
  config.data.eval_slices = ""  # comma-separated z of slices kept for evaluation only
  config.data.classes = ()  # filled from the volume at the start of training
  config.data.augment = True
  config.data.flips = True  # in-plane flips and quarter turns
  config.data.gain = 0.1  # per-channel intensity jitter magnitudes
  config.data.offset = 0.1
  config.data.gamma = 0.2
  config.data.reverse_slab = True  # also read slabs upside down (z reversed)
  config.data.prefetch = 2
  config.data.workers = 4  # threads that normalise and augment a batch

  config.model = ml_collections.ConfigDict()
  config.model.name = "unet"
  config.model.num_classes = -1  # -1: take the class count from the volume

  config.train = ml_collections.ConfigDict()
  config.train.seed = 0
  config.train.batch_size = 8  # global, over all devices and processes
  config.train.steps = 2000
  config.train.learning_rate = 1e-3
  config.train.warmup_steps = 100
  config.train.weight_decay = 1e-4
  config.train.grad_clip = 1.0
  config.train.dice_weight = 1.0
  config.train.class_weights = True  # inverse-sqrt label frequency of the training area
  config.train.eval_every = 200  # validation, and a checkpoint, every N steps
  config.train.keep = 3  # latest checkpoints kept (the best one is kept too)
  # Fine-tuning: start from the weights of another run (its workdir or a checkpoint step
  # directory) instead of a random init; the optimizer starts afresh.
  config.train.init_from = ""
  config.train.log_every = 20

  # Semi-supervised training from the unannotated slices (fibseg_jax.train.state.Semi):
  # a teacher, the moving average of the weights, labels unlabelled patches from the whole
  # stack and the student learns them under augmentation. weight 0 turns it off.
  config.semi = ml_collections.ConfigDict()
  config.semi.weight = 0.0  # weight of the unsupervised loss
  config.semi.mode = "pseudo"  # "pseudo": confident pseudo-labels; "soft": probabilities
  config.semi.threshold = 0.9  # confidence of a pseudo-label
  config.semi.ema = 0.99  # teacher = moving average of the weights; 0 = the student
  config.semi.rampup = 0.25  # share of train.steps over which the weight rises to full
  config.semi.batch_size = -1  # unlabelled patches per step; -1: train.batch_size
  return config


def parse_ints(value: str | int | list | tuple, flag: str) -> tuple[int, ...]:
  """'3,7' or [3, 7] -> (3, 7), with an error that names the flag."""
  if isinstance(value, int):
    return (value,)
  if isinstance(value, list | tuple):
    items = list(value)
  else:
    items = [v for v in str(value).replace(" ", "").split(",") if v]
  try:
    return tuple(int(v) for v in items)
  except ValueError:
    raise ConfigError(f"{flag}={value}: expected comma-separated integers, e.g. 3,7") from None


def parse_names(value: str | list | tuple, flag: str) -> tuple[str, ...]:
  """'ICE,TLD' or ['ICE', 'TLD'] -> ('ICE', 'TLD')."""
  if isinstance(value, list | tuple):
    names = tuple(str(v).strip() for v in value)
  else:
    names = tuple(v.strip() for v in str(value).split(",") if v.strip())
  if not names:
    raise ConfigError(f"{flag}: give at least one name, e.g. ICE,TLD")
  if len(set(names)) != len(names):
    raise ConfigError(f"{flag}={value}: names repeat")
  return names
