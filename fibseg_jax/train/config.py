"""The experiment config shared by every model: data, model and training fields.

Experiment files under fibseg_jax/configs/ start from `base_config()` and fill in
`config.model`. The names here are part of the command-line interface
(`--config.data.channels=ICE,TLD`, `--config.train.batch_size=8`, ...), and the whole
config is saved with every checkpoint so a checkpoint alone rebuilds its model. `FIELDS`
holds each field's default with one line of help, which `fibseg train --config=...
--show_config` prints.
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Mapping
from typing import Any

import ml_collections

from fibseg_jax import models
from fibseg_jax.data import lists


class ConfigError(ValueError):
  """A user mistake in the experiment config, its flags or its workdir.

  The message names the flag and the expected value. Experiment scripts print it as one
  line; any other exception is a bug and keeps its traceback.
  """


# Every field of `base_config()`: (dotted name, default, one line of help), in the order
# `fibseg train --show_config` prints them. The model's own fields (model.depth,
# model.features, ...) are documented in its config class (`field_help`).
FIELDS: tuple[tuple[str, Any, str], ...] = (
  ("data.path", "", "volume to train on, written by `fibseg ingest` or `fibseg make-synthetic`"),
  ("data.channels", "ICE,TLD", "comma-separated channel names of the volume the model takes"),
  ("data.slices", 3, "slab depth, odd: the annotated slice and (slices - 1) / 2 either side"),
  ("data.patch", 192, "y-x side of a training patch in pixels (a multiple of 2**model.depth)"),
  ("data.val_fraction", 0.25, "share of the annotated area held out for validation"),
  ("data.val_block", 128, "side of a square validation block in pixels"),
  ("data.split_seed", 0, "seed of the validation split, independent of train.seed"),
  (
    "data.eval_slices",
    "",
    "comma-separated slice numbers (those of the files) of annotated slices kept for "
    "evaluation only",
  ),
  ("data.classes", (), "class names; filled from the volume at the start of training"),
  ("data.augment", True, "augment the training patches (the flips and jitters below)"),
  ("data.flips", True, "in-plane flips (and quarter turns unless data.rot90 says otherwise)"),
  ("data.rot90", None, "in-plane quarter turns, true or false; unset: as data.flips"),
  ("data.gain", 0.1, "magnitude of the per-channel intensity gain jitter"),
  ("data.offset", 0.1, "magnitude of the per-channel intensity offset jitter"),
  ("data.gamma", 0.2, "magnitude of the per-channel gamma jitter"),
  ("data.reverse_slab", True, "also read slabs upside down (z reversed)"),
  # The rest of the recipe (fibseg_jax.data.augment; LoaderConfig's docstring says more).
  ("data.rotation", 0.0, "rotate patches by up to this many degrees (180: any angle); 0 = off"),
  ("data.scale", 0.0, "zoom by 2**u, u in [-scale, scale] (0.5: about 0.7-1.4); 0 = off"),
  ("data.elastic", 0.0, "elastic deformation of this magnitude in pixels; 0 = off"),
  ("data.spatial_p", 0.2, "probability of each of rotation, scaling and elastic deformation"),
  ("data.noise", 0.0, "Gaussian noise of standard deviation up to this (normalised); 0 = off"),
  ("data.blur", 0.0, "Gaussian blur, sigma up to this many pixels; 0 = off"),
  ("data.contrast", 0.0, "contrast factor in [1 - contrast, 1 + contrast]; 0 = off"),
  ("data.lowres", 0.0, "simulated low resolution, down by up to 1 - lowres and back; 0 = off"),
  ("data.invert_gamma", 0.0, "probability that the gamma jitter bends the inverted image"),
  ("data.intensity_p", 0.15, "probability of each of noise, blur, contrast, low resolution"),
  ("data.curtain", 0.0, "depth of simulated curtaining stripes along y, per channel; 0 = off"),
  ("data.shading", 0.0, "amplitude of a smooth simulated detector-shading field; 0 = off"),
  ("data.charging", 0.0, "brightness of simulated charging streaks and patches; 0 = off"),
  ("data.drift", 0.0, "in-plane shift between slices of a slab, pixels per slice; 0 = off"),
  ("data.artifact_p", 0.3, "probability of each simulated FIB-SEM artifact per channel"),
  (
    "data.rare_fraction",
    0.0,
    "share of patches drawn class-balanced (a class, then a place holding it); 0 = off",
  ),
  ("data.prefetch", 2, "batches read ahead of the training step"),
  ("data.workers", 4, "threads that normalise and augment a batch"),
  ("model.name", "unet", "the network: unet (2D / 2.5D U-Net) or sensor3d (U-Net + ConvLSTMs)"),
  ("model.num_classes", -1, "output classes; -1: take the class count from the volume"),
  ("train.seed", 0, "seed of the initial weights and of the batches"),
  ("train.batch_size", 8, "patches per step, over all devices and processes"),
  ("train.steps", 2000, "training steps in all (a resumed run stops at the same step)"),
  ("train.learning_rate", 1e-3, "peak learning rate, reached after train.warmup_steps"),
  ("train.warmup_steps", 100, "steps of linear warm-up to the peak learning rate"),
  ("train.weight_decay", 1e-4, "weight decay (adamw: decoupled; sgd: L2 term in the gradient)"),
  (
    "train.optimizer",
    "adamw",
    "adamw, or sgd: Nesterov momentum 0.99 as nnU-Net (which sets "
    "--config.train.learning_rate=0.01 --config.train.weight_decay=3e-5)",
  ),
  (
    "train.schedule",
    "cosine",
    "decay after the warm-up: cosine (to 1% of the peak), poly: nnU-Net's "
    "lr * (1 - t)**0.9, t = (step - warm-up) / (steps - warm-up), or constant",
  ),
  (
    "train.deep_supervision",
    False,
    "also train 1x1 heads on the lower decoder levels, weighted 1/2**level as nnU-Net; "
    "inference uses the full-resolution head only",
  ),
  ("train.grad_clip", 1.0, "clip the global gradient norm to this; 0 = no clipping"),
  ("train.dice_weight", 1.0, "weight of the soft Dice loss added to the cross-entropy"),
  (
    "train.class_weights",
    True,
    "weight classes by inverse-sqrt label frequency of the training area",
  ),
  ("train.eval_every", 200, "validation, and a checkpoint, every N steps"),
  ("train.keep", 3, "latest checkpoints kept (the best one by validation mean IoU is kept too)"),
  (
    "train.init_from",
    "",
    "fine-tune: start from the weights of another run (its workdir or a checkpoint step "
    "directory), with a fresh optimizer; they are scored and kept as checkpoint 0. `prior` "
    "(or a folder of prior.msgpack + prior.json): a U-Net with the prior's backbone, its "
    "first conv fitted to the channels and slab depth, a fresh head (docs/prior.md)",
  ),
  (
    "train.init_lr_scale",
    1.0,
    "with train.init_from: peak learning rate = train.learning_rate x this; lower dips "
    "less after the warm-up but ends lower (docs/recipe.md, Fine-tuning)",
  ),
  ("train.log_every", 20, "training metrics logged every N steps"),
  # Semi-supervised training from the unannotated slices (fibseg_jax.train.state.Semi): a
  # teacher, the moving average of the weights, labels unlabelled patches from the whole
  # stack and the student learns them under augmentation.
  ("semi.weight", 0.0, "weight of the semi-supervised loss on unannotated slices; 0 = off"),
  ("semi.mode", "pseudo", "pseudo: the teacher's confident labels; soft: its probabilities"),
  ("semi.threshold", 0.9, "confidence a teacher's pseudo-label needs"),
  ("semi.ema", 0.99, "teacher = moving average of the weights with this decay; 0 = the student"),
  ("semi.rampup", 0.25, "share of train.steps over which semi.weight rises to full"),
  ("semi.batch_size", -1, "unlabelled patches per step; -1: train.batch_size"),
  # Distillation (fibseg_jax.train.distill): a teacher's class probabilities over the whole
  # stack, computed once before training, taught on patches from any slice.
  (
    "distill.teacher",
    "",
    "distil a teacher: comma-separated training workdirs (an ensemble), a probabilities "
    "array of `fibseg segment --probabilities`, or `forest` (a random forest fitted on "
    "the training pixels: for brush strokes); empty = off",
  ),
  ("distill.weight", 1.0, "weight of the soft cross-entropy to the teacher's probabilities"),
  ("distill.tta", "all", "test-time augmentation of the teacher's predictions (as segment --tta)"),
  ("distill.batch_size", -1, "patches from the whole stack per step; -1: train.batch_size"),
)

# Fields whose default (None) means "decided by another field", with the type they take.
_UNSET_TYPES: dict[str, type] = {"data.rot90": bool}

# One line of help per field of `base_config()`.
HELP: dict[str, str] = {name: text for name, _, text in FIELDS}


def base_config() -> ml_collections.ConfigDict:
  """Defaults of the paper's setting: three annotated slices, 25% held out (`FIELDS`)."""
  config = ml_collections.ConfigDict()
  for name, default, _ in FIELDS:
    section, field = name.split(".")
    if section not in config:
      config[section] = ml_collections.ConfigDict()
    if name in _UNSET_TYPES:  # a fresh typed placeholder, so --config.x=true can set it
      default = ml_collections.config_dict.placeholder(_UNSET_TYPES[name])
    config[section][field] = default
  return config


def flat_fields(config: ml_collections.ConfigDict | Mapping[str, Any]) -> dict[str, Any]:
  """{dotted name: value} of every leaf of a config, e.g. {"train.steps": 2000, ...}."""
  out: dict[str, Any] = {}
  for key, value in config.items():
    if isinstance(value, ml_collections.ConfigDict | Mapping):
      out.update({f"{key}.{k}": v for k, v in flat_fields(value).items()})
    else:
      out[key] = value
  return out


def _attribute_help(cls: type) -> dict[str, str]:
  """{field: its text as one line} from the Attributes of a Google-style class docstring."""
  lines = (cls.__doc__ and inspect.cleandoc(cls.__doc__) or "").splitlines()
  if "Attributes:" not in lines:
    return {}
  out: dict[str, str] = {}
  name = None
  for line in lines[lines.index("Attributes:") + 1 :]:
    if not line.startswith("  "):
      break
    match = re.match(r"  (\w+): (.*)", line)
    if match:
      name, text = match.groups()
      out[name] = text.strip()
    elif name is not None:  # a continuation line
      out[name] += " " + line.strip()
  return {name: text.removesuffix(".") for name, text in out.items()}


def field_help(config: ml_collections.ConfigDict) -> dict[str, str]:
  """One line of help per dotted field of an experiment config ("" where none is known).

  Base fields are documented in `FIELDS`; `model.*` in the Attributes of the model's
  config class (e.g. `UNetConfig`), whose defaults experiment files copy.
  """
  model_help: dict[str, str] = {}
  name = config.get("model", {}).get("name")
  if name in models.MODELS:
    # A model config documents its own fields; the shared ones are in its base classes.
    for cls in reversed(models.MODELS[name][0].__mro__[:-1]):
      model_help.update(_attribute_help(cls))
  out = {}
  for dotted in flat_fields(config):
    section, _, field = dotted.partition(".")
    text = HELP.get(dotted)
    if text is None and section == "model":
      text = model_help.get(field)
    out[dotted] = text or ""
  return out


def parse_ints(value: str | int | list | tuple, flag: str) -> tuple[int, ...]:
  """'3,7' or [3, 7] -> (3, 7), with an error that names the flag (`lists.parse_list`)."""
  return lists.parse_list(value, int, flag=flag, error=ConfigError)


def parse_names(value: str | list | tuple, flag: str) -> tuple[str, ...]:
  """'ICE,TLD' or ['ICE', 'TLD'] -> ('ICE', 'TLD'): at least one, none repeated."""
  names = lists.parse_list(value, str, flag=flag, error=ConfigError)
  if not names:
    raise ConfigError(f"{flag}: give at least one name, e.g. ICE,TLD")
  if len(set(names)) != len(names):
    raise ConfigError(f"{flag}={value}: names repeat")
  return names
