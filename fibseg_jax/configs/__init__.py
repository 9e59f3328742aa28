"""Experiment configs, in the flax `configs/` manner: each file's `get_config()` starts from
`fibseg_jax.train.config.base_config()`.

`fibseg train --config=unet` (or `sensor3d`) takes one of these by name; `--config=FILE`
takes any file of your own with a `get_config()`. `fibseg train --config=unet
--show_config` lists every field with its default and one line of help.
"""

import importlib.util
import os
from collections.abc import Sequence
from typing import Any

DIRECTORY = os.path.dirname(os.path.abspath(__file__))


def names(directory: str = DIRECTORY, exclude: Sequence[str] = ()) -> list[str]:
  """The config files of `directory` by name, e.g. ['sensor3d', 'unet'] (default: the
  experiment configs shipped with the package)."""
  return sorted(
    f[: -len(".py")]
    for f in os.listdir(directory)
    if f.endswith(".py") and not f.startswith("_") and f[: -len(".py")] not in exclude
  )


def load(path: str, *args: Any) -> Any:
  """What the `get_config(*args)` of the config file at `path` returns.

  Raises:
    ValueError: the file defines no get_config(). (A bug in the file keeps its traceback.)
  """
  spec = importlib.util.spec_from_file_location("fibseg_config_file", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  if not callable(getattr(module, "get_config", None)):
    raise ValueError("defines no get_config()")
  return module.get_config(*args)


def path(name: str) -> str | None:
  """The file of a shipped config given by name ('unet' or 'unet.py'), else None."""
  name = name[: -len(".py")] if name.endswith(".py") else name
  return os.path.join(DIRECTORY, f"{name}.py") if name in names() else None
