"""Progress bars for the package's long loops: live on a terminal, a few lines in a log.

`bar` is tqdm on a terminal. When the stream is not a terminal (piped to a log file, a
batch job's output), redrawing the bar in place writes thousands of carriage-return
separated updates; there `bar` writes one plain line at the start, one each time
another `LOG_EVERY` of the total is done, and one at the end (for a loop of unknown
length, one line every `LOG_SECONDS`).

This module imports nothing from the package, so every layer can use it.
"""

from __future__ import annotations

import math
import sys
import time
from typing import Any

from tqdm import tqdm

# A log gets a line per this share of the total (5%: about 20 lines a loop).
LOG_EVERY = 0.05
# ... or, when the total is unknown, per this many seconds.
LOG_SECONDS = 60.0


def _is_terminal(stream: Any) -> bool:
  try:
    return bool(stream.isatty())
  except (AttributeError, ValueError):  # no isatty, or closed
    return False


class _Lines:
  """A stream for tqdm that writes each update as its own line (for logs)."""

  def __init__(self, stream: Any):
    self.stream = stream

  def write(self, text: str) -> None:
    line = text.replace("\r", "").rstrip()
    if line:
      self.stream.write(line + "\n")

  def flush(self) -> None:
    self.stream.flush()


class Bar(tqdm):
  """tqdm that, on a stream that is not a terminal, writes a line per `LOG_EVERY`."""

  def __init__(self, *args: Any, **kwargs: Any):
    stream = kwargs.get("file") or sys.stderr
    self._log = not _is_terminal(stream)
    self._next = 0.0  # the share of the total whose line comes next
    self._printed_at: float | None = None  # the count and time of the last line
    self._printed_time = -math.inf
    self._closing = False
    if self._log:
      kwargs["file"] = _Lines(stream)
      kwargs.update(mininterval=0, maxinterval=math.inf, dynamic_ncols=False)
      kwargs.setdefault("ncols", 100)
    super().__init__(*args, **kwargs)

  def display(self, msg: str | None = None, pos: int | None = None) -> Any:
    if not self._log:
      return super().display(msg, pos)
    if msg == "":  # clearing a bar (leave=False): nothing to clear in a log
      return True
    now = time.monotonic()
    if self._closing:
      due = self._printed_at != self.n
    elif self.total:
      due = self.n / self.total >= self._next - 1e-12
    else:
      due = now - self._printed_time >= LOG_SECONDS
    if not due:
      return True
    if self.total:
      self._next = (math.floor(self.n / self.total / LOG_EVERY + 1e-9) + 1) * LOG_EVERY
    self._printed_at, self._printed_time = self.n, now
    return super().display(msg, pos)

  def close(self) -> None:
    self._closing = True
    super().close()


def bar(iterable: Any = None, **kwargs: Any) -> Bar:
  """A progress bar (tqdm's arguments): live on a terminal, a line per 5% in a log."""
  return Bar(iterable, **kwargs)
