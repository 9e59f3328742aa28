"""The one typed path from the experiment config to the slab loader's `LoaderConfig`.

`loader_config(config)` reads `config.data`, `config.train` and `config.semi` (a
`ml_collections.ConfigDict`, or the dict a checkpoint saved as JSON, where tuples are
lists and comma strings may stand for lists) and builds the frozen dataclass the data
layer takes. Its errors, and the loader's re-raised through `config_error`, name the
`--config.*` flag.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from fibseg_jax.data import loader as loader_lib
from fibseg_jax.data import volume as volume_lib
from fibseg_jax.train import config as config_lib
from fibseg_jax.train.config import ConfigError

# How each LoaderConfig field is spelled on the command line, for error messages.
FLAGS: Mapping[str, str] = {
  "channels": "--config.data.channels",
  "slices": "--config.data.slices",
  "patch": "--config.data.patch",
  "batch_size": "--config.train.batch_size",
  "val_fraction": "--config.data.val_fraction",
  "val_block": "--config.data.val_block",
  "eval_slices": "--config.data.eval_slices",
  "gain": "--config.data.gain",
  "offset": "--config.data.offset",
  "gamma": "--config.data.gamma",
  "prefetch": "--config.data.prefetch",
  "workers": "--config.data.workers",
  "size_multiple": "--config.model (its size multiple)",
  "unlabelled_batch": "--config.semi.batch_size",
  "teacher": "--config.distill.teacher",
}


# LoaderConfig fields read straight from config.data, with their type.
_DATA_FIELDS: Mapping[str, type] = {
  "slices": int,
  "patch": int,
  "val_fraction": float,
  "val_block": int,
  "augment": bool,
  "flips": bool,
  "gain": float,
  "offset": float,
  "gamma": float,
  "reverse_slab": bool,
  **{name: float for name in (*loader_lib.NON_NEGATIVE, *loader_lib.PROBABILITIES)},
  "contrast": float,
  "lowres": float,
  "workers": int,
  "split_seed": int,
  "prefetch": int,
}


def flag(field: str) -> str:
  """The command-line flag of a `LoaderConfig` field, e.g. 'patch' -> '--config.data.patch'."""
  return FLAGS.get(field, f"--config.data.{field}")


def unlabelled_batch(config: Any) -> int:
  """Global unlabelled patches per step: semi.batch_size with semi-supervision,
  distill.batch_size with a teacher to distil (-1: train.batch_size), else 0."""
  semi = config.get("semi") or {}
  distill = config.get("distill") or {}
  if float(semi.get("weight") or 0) > 0:
    size = int(semi.get("batch_size", -1))
  elif distill.get("teacher"):
    size = int(distill.get("batch_size", -1))
  else:
    return 0
  return int(config["train"]["batch_size"]) if size == -1 else size


def eval_slices(config: Any, numbering: volume_lib.SliceNumbers | None = None) -> tuple[int, ...]:
  """The z of `config.data.eval_slices`, which name the user's slice numbers (those of
  the files, `volume_lib.SliceNumbers`); with no `numbering`, the values themselves.

  Raises:
    ConfigError: a value that is not a slice number of the volume, naming the flag.
  """
  numbers = config_lib.parse_ints(config["data"].get("eval_slices"), flag("eval_slices"))
  if numbering is None:
    return numbers
  try:
    return numbering.to_zs(numbers, f"{flag('eval_slices')}={','.join(map(str, numbers))}")
  except volume_lib.VolumeError as e:
    raise ConfigError(str(e)) from None


def loader_config(
  config: Any,
  *,
  size_multiple: int = 1,
  unlabelled: int | None = None,
  teacher: str = "",
  numbering: volume_lib.SliceNumbers | None = None,
) -> loader_lib.LoaderConfig:
  """The loader settings of an experiment config.

  Args:
    config: the experiment config (`base_config()` and its overrides), or its dict.
    size_multiple: the model's required multiple of the patch size.
    unlabelled: global unlabelled patches per step; None: `unlabelled_batch(config)`.
    teacher: the probabilities array read with the unlabelled patches (distillation,
      `distill.settings(...).array`), or "".
    numbering: the volume's slice numbers: `data.eval_slices` name them and become z
      (`eval_slices`); None takes them as z.

  Returns:
    The `LoaderConfig`; `data.rot90` unset (None) turns with `data.flips`.

  Raises:
    ConfigError: a value of the wrong type or range, naming its --config.* flag.
  """
  d, t = config["data"], config["train"]
  values: dict[str, Any] = {}
  for field, kind in _DATA_FIELDS.items():
    value = d.get(field)
    try:
      values[field] = kind(value)
    except (TypeError, ValueError):
      raise ConfigError(f"{flag(field)}={value!r}: expected {kind.__name__}") from None
  if not 0 < values["val_fraction"] < 1:
    # The loader takes 0 (no validation); training keeps the best checkpoint by
    # validation mean IoU, so it needs some.
    raise ConfigError(f"{flag('val_fraction')}={d.get('val_fraction')} must be in (0, 1)")
  rot90 = d.get("rot90")
  values["rot90"] = values["flips"] if rot90 is None else bool(rot90)
  return loader_lib.LoaderConfig(
    channels=config_lib.parse_names(d.get("channels"), flag("channels")),
    eval_slices=eval_slices(config, numbering),
    batch_size=int(t["batch_size"]),
    seed=int(t["seed"]),
    size_multiple=int(size_multiple),
    unlabelled_batch=unlabelled_batch(config) if unlabelled is None else int(unlabelled),
    teacher=str(teacher),
    flag_names=FLAGS,
    **values,
  )
