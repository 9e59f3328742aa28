"""`--config=FILE` and `--config.FIELD=VALUE`, checked before absl parses them.

ml_collections answers a mistyped field with a long traceback and a missing file with an
error deep in the first access; here each mistake is one line naming the flag, the value
and what was expected. `describe` prints a config's fields for `--show_config`.
"""

from __future__ import annotations

import ast
import difflib
import os
import re
from collections.abc import Sequence
from typing import Any

import ml_collections
from absl import flags

from fibseg_jax import configs
from fibseg_jax.train import config as config_lib

# --config=FILE (or --config FILE) and --config.a.b=VALUE / --noconfig.a.b (booleans).
_FILE_ARG = re.compile(r"--?config(?:=(?P<value>.*))?$", re.S)
_FIELD_ARG = re.compile(r"--?(?P<no>no)?config\.(?P<name>[^=]*)(?:=(?P<value>.*))?$", re.S)
_PARSERS = {
  bool: (flags.BooleanParser(), "true or false"),
  int: (flags.IntegerParser(), "an integer"),
  float: (flags.FloatParser(), "a number"),
}


class ConfigArgError(ValueError):
  """A --config argument that cannot work; the message is one line naming it."""


def configs_hint() -> str:
  """What --config takes, e.g. 'give a config by name (sensor3d, unet) or a file with a
  get_config()'."""
  return f"give a config by name ({', '.join(configs.names())}) or a file with a get_config()"


def resolve(args: Sequence[str]) -> list[str]:
  """`args` with a --config given by name (`--config=unet`, `--config unet:arg`) replaced by
  the packaged file (`fibseg_jax/configs/unet.py`); a path that exists wins."""
  out = list(args)
  for i, arg in enumerate(out):
    if arg == "--":
      break
    match = _FILE_ARG.match(arg)
    if not match:
      continue
    inline = match.group("value") is not None
    at = i if inline else i + 1
    if at >= len(out):
      break
    value = match.group("value") if inline else out[at]
    name, sep, rest = value.partition(":")
    packaged = configs.path(name)
    if packaged is not None and not os.path.exists(name):
      new = packaged + sep + rest
      out[at] = f"--config={new}" if inline else new
  return out


def load_config(value: str) -> ml_collections.ConfigDict:
  """The config a `--config=value` flag gives: FILE or FILE:ARG, as ml_collections reads it.

  Raises:
    ConfigArgError: FILE does not exist or has no get_config().
  """
  path, *config_args = value.split(":", 1)
  if not os.path.isfile(path):
    what = "is a directory, not a config file" if os.path.isdir(path) else "no such file"
    raise ConfigArgError(f"--config={value}: {what}; {configs_hint()}")
  try:
    return configs.load(path, *config_args)
  except ValueError as e:
    raise ConfigArgError(f"--config={value}: {e}; {configs_hint()}") from None


def config_value(args: Sequence[str]) -> str | None:
  """The value of the last --config=FILE in `args` (arguments after the program name)."""
  found = None
  for i, arg in enumerate(args):
    if arg == "--":
      break
    match = _FILE_ARG.match(arg)
    if match:
      value = match.group("value")
      found = value if value is not None else (args[i + 1] if i + 1 < len(args) else None)
  return found


def _check_value(flag: str, value: str, default: Any) -> None:
  kind = type(default)
  if kind not in _PARSERS:
    return  # strings take anything; tuples are left to ml_collections
  parser, expected = _PARSERS[kind]
  try:
    parser.parse(value)
  except (ValueError, TypeError):
    raise ConfigArgError(
      f"{flag}={value}: expected {expected} (the default is {format_value(default)})"
    ) from None


def check_args(args: Sequence[str]) -> ml_collections.ConfigDict | None:
  """Checks the --config arguments of a command line before absl parses it.

  Args:
    args: the arguments after the program name.

  Returns:
    The config file's config (without overrides), or None without --config.

  Raises:
    ConfigArgError: a missing config file, an unknown field (with the nearest names), a
      value that the field's type cannot take.
  """
  value = config_value(args)
  if value is None:
    return None
  config = load_config(value)
  fields = config_lib.flat_fields(config)
  for arg in args:
    if arg == "--":
      break
    match = _FIELD_ARG.match(arg)
    if not match:
      continue
    name, given = match.group("name"), match.group("value")
    flag = f"--config.{name}"
    if name not in fields:
      close = difflib.get_close_matches(name, list(fields), n=1, cutoff=0.6)
      hint = (
        f"did you mean --config.{close[0]}?"
        if close
        else f"--config={value} --show_config lists the fields"
      )
      raise ConfigArgError(f"{flag}: no such config field; {hint}")
    if given is not None and not match.group("no"):
      _check_value(flag, given, fields[name])
  return config


def format_value(value: Any) -> str:
  """A value as it is written after --config.FIELD= (tuples without spaces, '' if empty)."""
  if isinstance(value, tuple | list):
    items = ",".join(format_value(v) for v in value)
    return f"({items},)" if len(value) == 1 else f"({items})"
  if isinstance(value, str):
    return value if value else "''"
  if isinstance(value, bool):
    return "true" if value else "false"
  return repr(value)


def describe(config: ml_collections.ConfigDict, defaults: ml_collections.ConfigDict) -> str:
  """Every field of `config`: dotted name, value (and the file's, where overridden), help.

  Args:
    config: the config with the command line's overrides.
    defaults: the config file's config.
  """
  helps = config_lib.field_help(config)
  default_values = config_lib.flat_fields(defaults)
  rows = []
  for name, value in config_lib.flat_fields(config).items():
    shown = format_value(value)
    if name in default_values and default_values[name] != value:
      shown += f" (file: {format_value(default_values[name])})"
    rows.append((name, shown, helps.get(name, "")))
  width = max(len(name) for name, _, _ in rows)
  value_width = min(max(len(v) for _, v, _ in rows), 24)
  lines = [f"{name:<{width}}  {v:<{value_width}}  {h}".rstrip() for name, v, h in rows]
  return "\n".join(lines)


def study_fields() -> dict[str, Any]:
  """{dotted field: default} of every shipped config (unet first): what a study's
  --config.FIELD=VALUE may set."""
  fields: dict[str, Any] = {}
  for name in configs.names():
    for field, value in config_lib.flat_fields(configs.load(configs.path(name))).items():
      fields.setdefault(field, value)
  return fields


def _typed(flag: str, given: str, default: Any) -> Any:
  """`given` as the type of the field's `default` (a tuple from "(a,b)" or "a,b")."""
  _check_value(flag, given, default)
  kind = type(default)
  if kind in _PARSERS:
    return _PARSERS[kind][0].parse(given)
  if isinstance(default, tuple) and given.startswith("("):
    try:
      return tuple(ast.literal_eval(given))
    except (ValueError, SyntaxError, TypeError):
      raise ConfigArgError(f"{flag}={given}: expected a tuple like (8,16,32)") from None
  return given  # a string, or a comma list that `study.runs.set_fields` splits


def split_overrides(args: Sequence[str]) -> tuple[list[str], dict[str, Any]]:
  """The --config.FIELD=VALUE arguments of a study's command line, typed.

  Args:
    args: the arguments after the program name.

  Returns:
    (the other arguments, {dotted field: value}) in the order given.

  Raises:
    ConfigArgError: --config=FILE (a study trains its own configs), an unknown field
      (with the nearest name) or a value the field's type cannot take.
  """
  fields = study_fields()
  rest, overrides = [], {}
  for i, arg in enumerate(args):
    if arg == "--":
      rest += args[i:]
      break
    if _FILE_ARG.match(arg):
      raise ConfigArgError(
        f"{arg}: a study trains the shipped configs; set their fields with --config.FIELD=VALUE"
      )
    match = _FIELD_ARG.match(arg)
    if not match:
      rest.append(arg)
      continue
    name, given = match.group("name"), match.group("value")
    flag = f"--config.{name}"
    if name not in fields:
      close = difflib.get_close_matches(name, list(fields), n=1, cutoff=0.6)
      listed = "fibseg train --config=unet --show_config lists the fields"
      hint = f"did you mean --config.{close[0]}?" if close else listed
      raise ConfigArgError(f"{flag}: no such config field; {hint}")
    if given is None:  # --config.train.deep_supervision / --noconfig.train.deep_supervision
      if not isinstance(fields[name], bool):
        raise ConfigArgError(f"{flag}: give a value, e.g. {flag}={format_value(fields[name])}")
      overrides[name] = not match.group("no")
    else:
      overrides[name] = _typed(flag, given, fields[name])
  return rest, overrides
