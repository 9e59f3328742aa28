"""The one parser of list values from a command line or a config: "3,7", "ICE,TLD", "0-10".

Flags and config fields that hold several values accept a comma-separated string (as
typed on a command line), a list (a config restored from JSON) or a tuple (a config file).
Every layer parses them here and wraps the error in its own error class.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any


def parse_list(
  value: Any,
  kind: Callable[[str], Any] = str,
  *,
  flag: str,
  error: type[Exception] = ValueError,
  expected: str | None = None,
  ranges: bool = False,
) -> tuple[Any, ...]:
  """'3,7', [3, 7] or (3, 7) -> (3, 7); a bare int or name is a list of one.

  Args:
    value: a comma-separated string, a list or tuple, or one value; None or "" -> ().
    kind: the type of each item, `int` or `str` (names are stripped of blanks).
    flag: the flag or field named in the error, e.g. "--config.data.eval_slices".
    error: the exception class raised on a bad item.
    expected: what the error says was expected; by default "comma-separated integers,
      e.g. 3,7" for ints.
    ranges: also read "lo-hi" (inclusive) as every integer from lo to hi (ints only).

  Returns:
    The items in the order given.

  Raises:
    `error`: an item is not of `kind` (or a range runs backwards).
  """
  if value is None:
    return ()
  if isinstance(value, list | tuple):
    items = list(value)
  elif isinstance(value, int) and kind is int:
    items = [value]
  elif kind is int:
    items = [v for v in str(value).replace(" ", "").split(",") if v]
  else:
    items = str(value).split(",")
  if kind is str:
    return tuple(s for s in (str(v).strip() for v in items) if s or isinstance(value, list | tuple))
  out: list[Any] = []
  try:
    for item in items:
      if ranges and isinstance(item, str) and "-" in item:
        lo, hi = (int(v) for v in item.split("-", 1))
        if hi < lo:
          raise ValueError(item)
        out.extend(range(lo, hi + 1))
      else:
        out.append(kind(item))
  except (TypeError, ValueError):
    what = expected or "comma-separated integers, e.g. 3,7"
    raise error(f"{flag}={value}: expected {what}") from None
  return tuple(out)
