"""The one typed path from the experiment's settings to the slab loader's `LoaderConfig`.

`loader_config(settings)` takes the `config.Settings` that `config.parse` made of the
experiment config and builds the frozen dataclass the data layer takes. Its errors, and
the loader's, name the `--config.*` flag (`FLAGS`).
"""

from __future__ import annotations

from collections.abc import Mapping

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


def flag(field: str) -> str:
  """The command-line flag of a `LoaderConfig` field, e.g. 'patch' -> '--config.data.patch'."""
  return FLAGS.get(field, f"--config.data.{field}")


def eval_zs(
  data: config_lib.DataSettings, numbering: volume_lib.SliceNumbers | None = None
) -> tuple[int, ...]:
  """The z of `data.eval_slices`, which name the user's slice numbers (those of the
  files, `volume_lib.SliceNumbers`); with no `numbering`, the values themselves.

  Raises:
    ConfigError: a value that is not a slice number of the volume, naming the flag.
  """
  numbers = data.eval_slices
  if numbering is None:
    return numbers
  try:
    return numbering.to_zs(numbers, f"{flag('eval_slices')}={','.join(map(str, numbers))}")
  except volume_lib.VolumeError as e:
    raise ConfigError(str(e)) from None


def loader_config(
  settings: config_lib.Settings,
  *,
  size_multiple: int = 1,
  unlabelled: int | None = None,
  teacher: str = "",
  numbering: volume_lib.SliceNumbers | None = None,
) -> loader_lib.LoaderConfig:
  """The loader settings of an experiment.

  Args:
    settings: the experiment's settings (`config.parse`).
    size_multiple: the model's required multiple of the patch size.
    unlabelled: global unlabelled patches per step; None: `settings.unlabelled_batch`.
    teacher: the probabilities array read with the unlabelled patches (distillation,
      `distill.settings(...).array`), or "".
    numbering: the volume's slice numbers: `data.eval_slices` name them and become z
      (`eval_zs`); None takes them as z.

  Returns:
    The `LoaderConfig`.

  Raises:
    ConfigError: an evaluation slice the volume does not have, naming its flag.
  """
  d, t = settings.data, settings.train
  return loader_lib.LoaderConfig(
    channels=d.channels,
    slices=d.slices,
    patch=d.patch,
    val_fraction=d.val_fraction,
    val_block=d.val_block,
    split_seed=d.split_seed,
    eval_slices=eval_zs(d, numbering),
    batch_size=t.batch_size,
    seed=t.seed,
    size_multiple=int(size_multiple),
    unlabelled_batch=settings.unlabelled_batch if unlabelled is None else int(unlabelled),
    teacher=str(teacher),
    flag_names=FLAGS,
    **d.recipe,
  )
