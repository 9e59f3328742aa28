"""Housekeeping of the block loop: the time of all blocks foretold from the first, and
freed memory given back to the OS. (Ctrl-C: `fibseg_jax.interrupt`.)
"""

from __future__ import annotations

import ctypes
import ctypes.util
from collections.abc import Sequence

from fibseg_jax.infer.tiling import Block


def duration(seconds: float) -> str:
  """A duration as a person reads it: "12.3 s", "4 min 10 s", "2 h 05 min"."""
  if seconds < 59.95:
    return f"{seconds:.1f} s"
  if seconds < 3599.5:
    whole = round(seconds)
    return f"{whole // 60} min {whole % 60} s"
  minutes = round(seconds / 60)
  return f"{minutes // 60} h {minutes % 60:02d} min"


def estimate(seconds: float, first: Block, blocks: Sequence[Block], done: int = 0) -> str:
  """The time of `blocks` from that of their `first`, in proportion to their pixels.

  With `done` == 0 (the run's first block, compiling included) the line foretells all of
  them; after the second block (`done` == 1, the steady rate) the time still to come.
  """
  total = seconds * sum(b.pixels for b in blocks) / first.pixels
  if done == 0:
    return (
      f"first block took {duration(seconds)} (compiling included); about {duration(total)} "
      f"for all {len(blocks)} blocks"
    )
  rest = total - seconds
  return (
    f"second block took {duration(seconds)}; about {duration(rest)} more for the other "
    f"{len(blocks) - 1} blocks"
  )


def _load_malloc_trim():
  try:
    return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
  except (OSError, AttributeError):  # not glibc
    return None


_MALLOC_TRIM = _load_malloc_trim()


def release_free_memory() -> None:
  """Hands memory freed by the last block back to the OS (glibc only).

  Each block allocates and frees arrays of tens of MB; glibc keeps much of that in its
  heaps once its adaptive mmap threshold has grown, and resident memory then creeps up
  by hundreds of MB over a large stack although the working set does not change.
  """
  if _MALLOC_TRIM is not None:
    _MALLOC_TRIM(0)
