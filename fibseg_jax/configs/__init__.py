"""Experiment configs, in the flax `configs/` manner: each file's `get_config()` starts from
`fibseg_jax.train.config.base_config()`.

`fibseg train --config=unet` (or `sensor3d`) takes one of these by name; `--config=FILE`
takes any file of your own with a `get_config()`. `fibseg train --config=unet
--show_config` lists every field with its default and one line of help.
"""

import os

DIRECTORY = os.path.dirname(os.path.abspath(__file__))


def names() -> list[str]:
  """The configs shipped with the package, e.g. ['sensor3d', 'unet']."""
  return sorted(
    f[: -len(".py")] for f in os.listdir(DIRECTORY) if f.endswith(".py") and not f.startswith("_")
  )


def path(name: str) -> str | None:
  """The file of a shipped config given by name ('unet' or 'unet.py'), else None."""
  name = name[: -len(".py")] if name.endswith(".py") else name
  return os.path.join(DIRECTORY, f"{name}.py") if name in names() else None
