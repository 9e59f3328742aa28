"""Clocks: synchronised repetitions, races that alternate their sides, the matmul reference.

A *side* is anything with
  prepare()      build, initialise and compile; untimed, but inside the memory meter;
  __call__()     one repetition, synchronised (it returns when the device is done);
  device_peak()  the device's peak bytes, or None (CPU).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Mapping
from typing import Any, Protocol

import jax
import jax.numpy as jnp
import numpy as np

from fibseg_jax.bench import machine


class Side(Protocol):
  def prepare(self) -> None: ...

  def __call__(self) -> None: ...

  def device_peak(self) -> int | None: ...


def clock(step: Callable[[], Any]) -> float:
  """Seconds one synchronised call of `step` takes."""
  start = time.perf_counter()
  step()
  return time.perf_counter() - start


def summary(step_s: list[float]) -> dict[str, Any]:
  """Median, min and max of timed repetitions (the median is the reported figure)."""
  return {
    "step_s": step_s,
    "step_s_median": statistics.median(step_s),
    "step_s_min": min(step_s),
    "step_s_max": max(step_s),
  }


def throughput(step_s: float, batch: int, size: int) -> dict[str, float]:
  """Patches/s and Mpixel/s (output pixels) of a step of `batch` patches of size^2."""
  return {"patches_per_s": batch / step_s, "mpixel_per_s": batch * size * size / step_s / 1e6}


def warm_up(sides: Mapping[str, Side], warmup: int) -> dict[str, dict[str, Any]]:
  """Prepares each side in turn, then runs its `warmup` untimed repetitions.

  Each side's preparation and warm-up run inside its own `MemoryMeter`, one side after
  the other (in the mapping's order), so the memory figures of one do not hold the
  other's working set.

  Returns:
    Per side: setup_s (prepare), warmup_s (list), memory.
  """
  results = {}
  for name, side in sides.items():
    with machine.MemoryMeter(side.device_peak) as meter:
      setup_s = clock(side.prepare)
      warm = [clock(side) for _ in range(warmup)]
    results[name] = {"setup_s": setup_s, "warmup_s": warm, "memory": meter.result()}
  return results


def alternate(sides: Mapping[str, Side], steps: int) -> dict[str, list[float]]:
  """`steps` timed repetitions of every side, interleaved.

  Repetition i runs every side once, starting with side i mod n, so load on a shared
  machine hits all sides alike and no side always runs right after another.

  Returns:
    Per side, its repetition times in seconds.
  """
  names = list(sides)
  times: dict[str, list[float]] = {name: [] for name in names}
  for i in range(steps):
    k = i % len(names)
    for name in names[k:] + names[:k]:
      times[name].append(clock(sides[name]))
  return times


def race(
  sides: Mapping[str, Side],
  steps: int,
  warmup: int,
  check: Callable[[], None] | None = None,
) -> dict[str, dict[str, Any]]:
  """`warm_up`, then `check()` (e.g. equal parameter counts), then `alternate`.

  Returns:
    Per side: setup_s, warmup_s, memory and the `summary` of its timed repetitions.
  """
  results = warm_up(sides, warmup)
  if check is not None:
    check()
  for name, step_s in alternate(sides, steps).items():
    results[name].update(summary(step_s))
  return results


def matmul_rate(n: int, repeats: int = 5) -> dict[str, Any]:
  """FLOP/s of a jitted n x n float32 matmul on the default device, after two warm-ups.

  The reference of FLOP utilisation: what this machine's XLA reaches on its best kernel.

  Returns:
    {"n", "flops": 2 n^3, "step_s_median", "flops_per_s"}.
  """
  rng = np.random.default_rng(0)
  a = jnp.asarray(rng.standard_normal((n, n), dtype=np.float32))
  b = jnp.asarray(rng.standard_normal((n, n), dtype=np.float32))
  dot = jax.jit(jnp.dot)
  step = lambda: dot(a, b).block_until_ready()
  for _ in range(2):
    step()
  median = statistics.median(clock(step) for _ in range(repeats))
  flops = 2.0 * n**3
  return {"n": n, "flops": flops, "step_s_median": median, "flops_per_s": flops / median}
