"""The experiment config shared by every model: data, model and training fields.

Experiment files under fibseg_jax/configs/ start from `base_config()` and fill in
`config.model`. The names here are part of the command-line interface
(`--config.data.channels=ICE,TLD`, `--config.train.batch_size=8`, ...), and the whole
config is saved with every checkpoint so a checkpoint alone rebuilds its model. `FIELDS`
holds each field's default with one line of help, which `fibseg train --config=...
--show_config` prints.

`parse(config)` reads the ConfigDict (or the dict a checkpoint saved as JSON, where
tuples are lists and comma strings may stand for lists) once, checks every field and
returns a frozen `Settings`; the layers below take its typed parts and never read the
ConfigDict again, which stays what users set, print and save.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
import re
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections

from fibseg_jax import models
from fibseg_jax.data import lists
from fibseg_jax.data import loader_config as loader_config_lib


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


# train.optimizer and train.schedule, the first of each the default of a saved config
# that predates them.
OPTIMIZERS = ("adamw", "sgd")
SCHEDULES = ("cosine", "poly", "constant")

# The loader's fields of config.data besides the named ones of `DataSettings`, with
# their type (`DataSettings.recipe`).
_RECIPE: Mapping[str, type] = {
  "augment": bool,
  "flips": bool,
  "gain": float,
  "offset": float,
  "gamma": float,
  "reverse_slab": bool,
  **{name: float for name in (*loader_config_lib.NON_NEGATIVE, *loader_config_lib.PROBABILITIES)},
  "contrast": float,
  "lowres": float,
  "workers": int,
  "prefetch": int,
}

_DEFAULTS: dict[str, Any] = {name: default for name, default, _ in FIELDS}


@dataclasses.dataclass(frozen=True)
class DataSettings:
  """`config.data`, typed and checked.

  Attributes:
    path: the volume to train on; "" when not given (`train.loop.prepare` asks for it).
    channels: channel names of the volume the model takes, e.g. ("ICE", "TLD").
    slices: slab depth.
    patch: y-x side of a training patch in pixels.
    eval_slices: the slice numbers (those of the files, `volume.SliceNumbers`) of the
      annotated slices kept for evaluation only.
    classes: class names; () until the volume fills them in.
    val_fraction: share of the annotated area held out for validation, in (0, 1).
    val_block: side of a square validation block in pixels.
    split_seed: seed of the validation split.
    recipe: the loader's other fields (augmentation, prefetch, workers) by their
      `LoaderConfig` name, typed; rot90 is decided (unset: as flips).
  """

  path: str
  channels: tuple[str, ...]
  slices: int
  patch: int
  eval_slices: tuple[int, ...]
  classes: tuple[str, ...]
  val_fraction: float
  val_block: int
  split_seed: int
  recipe: Mapping[str, Any]


@dataclasses.dataclass(frozen=True)
class TrainSettings:
  """`config.train`, typed and checked (`FIELDS` says what each field does)."""

  seed: int
  batch_size: int
  steps: int
  learning_rate: float
  warmup_steps: int
  weight_decay: float
  optimizer: str
  schedule: str
  deep_supervision: bool
  grad_clip: float
  dice_weight: float
  class_weights: bool
  eval_every: int
  keep: int
  init_from: str
  init_lr_scale: float
  log_every: int


@dataclasses.dataclass(frozen=True)
class Semi:
  """Semi-supervised training settings (`config.semi`); weight 0 turns it off.

  Attributes:
    weight: weight of the unsupervised loss once ramped up.
    mode: "pseudo" (confidence-thresholded pseudo-labels) or "soft" (squared
      difference of probabilities); see `losses.consistency`.
    threshold: confidence of a pseudo-label.
    ema: teacher weights <- ema * teacher + (1 - ema) * student after each step; 0 makes
      the teacher the student itself.
    rampup_steps: the weight rises as exp(-5 (1 - t)^2), t = step / rampup_steps, to 1.
    batch_size: global unlabelled patches per step (`semi.batch_size`, -1 made
      `train.batch_size`).
  """

  weight: float = 0.0
  mode: str = "pseudo"
  threshold: float = 0.9
  ema: float = 0.99
  rampup_steps: int = 0
  batch_size: int = 0

  @property
  def enabled(self) -> bool:
    return self.weight > 0

  def ramp(self, step: jax.Array) -> jax.Array:
    if self.rampup_steps <= 0:
      return jnp.ones((), jnp.float32)
    t = jnp.minimum(step.astype(jnp.float32) / self.rampup_steps, 1.0)
    return jnp.exp(-5.0 * (1.0 - t) ** 2)


@dataclasses.dataclass(frozen=True)
class DistillSettings:
  """`config.distill`, typed and checked; `train.distill.settings` resolves the teacher.

  Attributes:
    teacher: training workdirs (an ensemble), one probabilities array or ("forest",);
      () turns distillation off.
    weight: weight of the soft cross-entropy to the teacher's probabilities.
    tta: the teacher's test-time augmentation (segment's --tta values).
    batch_size: global patches from the whole stack per step (-1 made
      `train.batch_size`).
  """

  teacher: tuple[str, ...]
  weight: float
  tta: str
  batch_size: int


@dataclasses.dataclass(frozen=True)
class Settings:
  """An experiment config, typed and checked once (`parse`).

  Attributes:
    data, train, semi, distill: the sections of the config.
    model_name: `model.name`, e.g. "unet".
    model: the model's config dataclass (`models.config_from`); None while its class
      count is left to the volume (`model.num_classes=-1` and no classes yet).
  """

  data: DataSettings
  train: TrainSettings
  semi: Semi
  distill: DistillSettings
  model_name: str
  model: models.ModelConfig | None

  @property
  def unlabelled_batch(self) -> int:
    """Global unlabelled patches per step: the semi-supervised or distillation batch, or 0."""
    if self.semi.enabled:
      return self.semi.batch_size
    return self.distill.batch_size if self.distill.teacher else 0


def _sections(config: ml_collections.ConfigDict | Mapping[str, Any]) -> dict[str, dict]:
  """{section: {field: value}} of a ConfigDict or a saved dict; a missing section is {}."""
  out = {}
  for name in ("data", "train", "semi", "distill", "model"):
    section = config.get(name) or {}
    out[name] = dict(section.to_dict() if hasattr(section, "to_dict") else section)
  return out


def _value(sections: dict[str, dict], dotted: str) -> Any:
  """The field's value, or its default (`FIELDS`) where a saved config lacks it."""
  section, field = dotted.split(".")
  return sections[section].get(field, _DEFAULTS.get(dotted))


def _typed(sections: dict[str, dict], dotted: str, kind: type) -> Any:
  value = _value(sections, dotted)
  if kind is str:
    return "" if value is None else str(value)
  try:
    return kind(value)
  except (TypeError, ValueError):
    raise ConfigError(f"--config.{dotted}={value!r}: expected {kind.__name__}") from None


def _data(sections: dict[str, dict], classes: Sequence[str] | None) -> DataSettings:
  typed = lambda field, kind: _typed(sections, f"data.{field}", kind)  # noqa: E731
  recipe = {field: typed(field, kind) for field, kind in _RECIPE.items()}
  rot90 = _value(sections, "data.rot90")
  recipe["rot90"] = recipe["flips"] if rot90 is None else bool(rot90)
  data = DataSettings(
    path=typed("path", str),
    channels=parse_names(_value(sections, "data.channels"), "--config.data.channels"),
    slices=typed("slices", int),
    patch=typed("patch", int),
    eval_slices=parse_ints(_value(sections, "data.eval_slices"), "--config.data.eval_slices"),
    classes=tuple(
      str(c) for c in (_value(sections, "data.classes") if classes is None else classes) or ()
    ),
    val_fraction=typed("val_fraction", float),
    val_block=typed("val_block", int),
    split_seed=typed("split_seed", int),
    recipe=recipe,
  )
  if not 0 < data.val_fraction < 1:
    # The loader takes 0 (no validation); training keeps the best checkpoint by
    # validation mean IoU, so it needs some.
    value = _value(sections, "data.val_fraction")
    raise ConfigError(f"--config.data.val_fraction={value} must be in (0, 1)")
  return data


def _train(sections: dict[str, dict]) -> TrainSettings:
  kinds = {"int": int, "float": float, "bool": bool, "str": str}
  train = TrainSettings(
    **{
      f.name: _typed(sections, f"train.{f.name}", kinds[f.type])
      for f in dataclasses.fields(TrainSettings)
    }
  )
  for name in ("steps", "eval_every", "log_every", "keep"):
    if getattr(train, name) < 1:
      value = _value(sections, f"train.{name}")
      raise ConfigError(f"--config.train.{name}={value} must be at least 1")
  for name, allowed in (("optimizer", OPTIMIZERS), ("schedule", SCHEDULES)):
    if getattr(train, name) not in allowed:
      raise ConfigError(
        f"--config.train.{name}={getattr(train, name)!r}: expected one of "
        f"{', '.join(map(repr, allowed))}"
      )
  if train.init_from and not 0 < train.init_lr_scale <= 1:
    raise ConfigError(
      f"--config.train.init_lr_scale={_value(sections, 'train.init_lr_scale')}: expected a "
      "number in (0, 1], the share of --config.train.learning_rate a fine-tune peaks at"
    )
  return train


def _semi(sections: dict[str, dict], train: TrainSettings) -> Semi:
  numbers = ("weight", "threshold", "ema", "rampup", "batch_size")
  s = {name: _value(sections, f"semi.{name}") for name in (*numbers, "mode")}
  for name in numbers:
    try:
      value = float(s[name])
    except (TypeError, ValueError):
      value = float("nan")
    if not math.isfinite(value):
      raise ConfigError(f"--config.semi.{name}={s[name]}: expected a finite number")
  checks = (
    ("weight", float(s["weight"]) >= 0, ">= 0 (0 turns it off)"),
    ("mode", s["mode"] in ("pseudo", "soft"), "'pseudo' or 'soft'"),
    ("threshold", 0 < float(s["threshold"]) <= 1, "in (0, 1]"),
    ("ema", 0 <= float(s["ema"]) < 1, "in [0, 1)"),
    ("rampup", 0 <= float(s["rampup"]) <= 1, "in [0, 1], a share of train.steps"),
    ("batch_size", int(s["batch_size"]) == -1 or int(s["batch_size"]) >= 1, ">= 1 or -1"),
  )
  for name, ok, expected in checks:
    if not ok:
      raise ConfigError(f"--config.semi.{name}={s[name]}: expected {expected}")
  batch_size = int(s["batch_size"])
  return Semi(
    weight=float(s["weight"]),
    mode=str(s["mode"]),
    threshold=float(s["threshold"]),
    ema=float(s["ema"]),
    rampup_steps=round(float(s["rampup"]) * train.steps),
    batch_size=train.batch_size if batch_size == -1 else batch_size,
  )


def _distill(sections: dict[str, dict], train: TrainSettings) -> DistillSettings:
  d = sections["distill"]
  teacher = lists.parse_list(
    _value(sections, "distill.teacher") or "",
    str,
    flag="--config.distill.teacher",
    error=ConfigError,
  )
  try:
    weight = float(_value(sections, "distill.weight"))
    batch_size = int(_value(sections, "distill.batch_size"))
  except (TypeError, ValueError):
    raise ConfigError(
      f"--config.distill.weight={d.get('weight')!r} / --config.distill.batch_size="
      f"{d.get('batch_size')!r}: expected a number >= 0 and an integer >= 1 or -1"
    ) from None
  if not weight >= 0 or weight != weight:
    raise ConfigError(f"--config.distill.weight={d.get('weight')}: expected a number >= 0")
  if batch_size != -1 and batch_size < 1:
    raise ConfigError(f"--config.distill.batch_size={batch_size}: expected >= 1 or -1")
  return DistillSettings(
    teacher=teacher,
    weight=weight,
    tta=_typed(sections, "distill.tta", str),
    batch_size=train.batch_size if batch_size == -1 else batch_size,
  )


def parse(
  config: ml_collections.ConfigDict | Mapping[str, Any], classes: Sequence[str] | None = None
) -> Settings:
  """The experiment config typed and checked, once, for the layers below.

  Args:
    config: the experiment config (`base_config()` and its overrides), or the dict a
      checkpoint saved (lists for tuples, comma strings for lists; fields it lacks
      take their defaults).
    classes: the volume's class names, which fill `data.classes` and, where
      `model.num_classes` is -1, the model's class count; None: those of the config.

  Returns:
    The `Settings`.

  Raises:
    ConfigError: a value of the wrong type or range, naming its --config.* flag and
      the expected value.
  """
  sections = _sections(config)
  data = _data(sections, classes)
  train = _train(sections)
  model = sections["model"]
  model_name = str(model.get("name", _DEFAULTS["model.name"]))
  num_classes = model.get("num_classes", -1)
  if num_classes in (-1, None):
    num_classes = len(data.classes) or None
  elif classes is not None and num_classes != len(data.classes):
    raise ConfigError(
      f"--config.model.num_classes={num_classes} but volume {data.path} has "
      f"{len(data.classes)} classes {list(data.classes)}; use -1 to take them from the volume"
    )
  try:
    fields = {**model, "name": model_name, "num_classes": num_classes}
    built = models.config_from(fields) if num_classes else None
  except models.ModelConfigError as e:
    raise ConfigError(f"--config.model / --config.data: {e}") from None
  return Settings(
    data=data,
    train=train,
    semi=_semi(sections, train),
    distill=_distill(sections, train),
    model_name=model_name,
    model=built,
  )
