"""Ctrl-C (SIGINT) as a request to stop at the next safe point, for long loops.

Training stops after the step in flight and saves it; segmentation stops after the
block in progress. Both use `StopRequest`:

  with StopRequest(first="stopping after this step ...", protected="writing ...") as stop:
    for step in steps:
      ...
      if stop.requested:
        break
    with stop.protected():   # a checkpoint or the last writes: Ctrl-C cannot cut them
      save()

The first Ctrl-C only sets `requested` and prints `first`. Another one inside
`protected()` prints `protected` and changes nothing, so what is being written is
complete; anywhere else it raises KeyboardInterrupt at once (the caller words it, knowing
what was kept). SIGINT is taken over only from the main thread and only where Python's
default handler holds it, so embedding applications keep their own handling.

This module imports nothing from the package.
"""

from __future__ import annotations

import contextlib
import signal
import sys
import threading
from collections.abc import Iterator

from tqdm import tqdm


class StopRequest:
  """See the module docstring.

  Args:
    first: printed (stderr, above any progress bar) at the first Ctrl-C.
    protected: printed at a Ctrl-C inside `protected()`.
    enabled: False leaves SIGINT alone (e.g. several processes that cannot agree on a
      stopping point).
    event: set from another thread (a GUI's Cancel button) it is a first Ctrl-C: the
      loop stops at its next safe point. Works whether or not SIGINT is taken over.
  """

  def __init__(
    self,
    *,
    first: str,
    protected: str,
    enabled: bool = True,
    event: threading.Event | None = None,
  ):
    self._requested = False
    self._event = event
    self._first, self._protected_note = first, protected
    self._protected = False
    self._previous = None
    self._enabled = (
      enabled
      and threading.current_thread() is threading.main_thread()
      and signal.getsignal(signal.SIGINT) is signal.default_int_handler
    )

  @property
  def requested(self) -> bool:
    return self._requested or (self._event is not None and self._event.is_set())

  def __enter__(self) -> StopRequest:
    if self._enabled:
      self._previous = signal.signal(signal.SIGINT, self._handle)
    return self

  def __exit__(self, *exc_info) -> None:
    if self._previous is not None:
      signal.signal(signal.SIGINT, self._previous)
      self._previous = None

  def _handle(self, signum, frame) -> None:
    del signum, frame
    if self._protected:
      self._requested = True
      tqdm.write(f"Ctrl-C: {self._protected_note}", file=sys.stderr)
      return
    if self._requested:
      raise KeyboardInterrupt  # the caller words it, knowing what was kept
    self._requested = True
    tqdm.write(f"Ctrl-C: {self._first}", file=sys.stderr)

  @contextlib.contextmanager
  def protected(self) -> Iterator[None]:
    """A context in which Ctrl-C cannot stop what is being written."""
    self._protected = True
    try:
      yield
    finally:
      self._protected = False
