"""The machine a benchmark ran on, and the memory it used."""

from __future__ import annotations

import gc
import importlib.metadata
import os
import platform
import resource
import shlex
import sys
import threading
from collections.abc import Callable, Sequence
from typing import Any

import jax

try:
  import psutil
except ImportError:  # resource's lifetime peak is the fallback
  psutil = None

MIB = 1 << 20
VERSIONS = ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "numpy", "tensorstore")


def load_average() -> list[float]:
  """1, 5 and 15 minute load averages of the machine (shared machines: read with care)."""
  try:
    return [round(v, 2) for v in os.getloadavg()]
  except OSError:
    return []


def usable_cores() -> int:
  """Cores this process may run on (affinity), not the machine's total."""
  try:
    return len(os.sched_getaffinity(0))
  except AttributeError:
    return os.cpu_count() or 1


def cpu_model() -> str:
  """The processor's name from /proc/cpuinfo, else what `platform` knows."""
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("model name"):
          return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or platform.machine()


def memory_total_gib() -> float | None:
  """Physical memory of the machine in GiB, or None where it cannot be read."""
  if psutil is not None:
    return psutil.virtual_memory().total / (1 << 30)
  try:
    with open("/proc/meminfo") as f:
      for line in f:
        if line.startswith("MemTotal:"):
          return int(line.split()[1]) / (1 << 20)  # kB
  except OSError:
    pass
  return None


def version(distribution: str) -> str:
  """Installed version of a distribution, or "not installed"."""
  try:
    return importlib.metadata.version(distribution)
  except importlib.metadata.PackageNotFoundError:
    return "not installed"


def environment(command: Sequence[str] | None = None) -> dict[str, Any]:
  """Command line, machine, versions and JAX's devices.

  Args:
    command: the command line to record; default this process's `sys.argv`.
  """
  devices = jax.devices()
  argv = list(sys.argv if command is None else command)
  return {
    "command": " ".join(shlex.quote(a) for a in [sys.executable, *argv]),
    "machine": {
      "cpu": cpu_model(),
      "cores_usable": usable_cores(),
      "cores_total": os.cpu_count(),
      "memory_gib": memory_total_gib(),
      "platform": platform.platform(),
    },
    "versions": {"python": platform.python_version(), **{n: version(n) for n in VERSIONS}},
    "jax_device": {
      "backend": jax.default_backend(),
      "devices": [str(d) for d in devices],
      "device_kind": devices[0].device_kind,
      "xla_flags": os.environ.get("XLA_FLAGS", ""),
    },
  }


def peak_rss_mib() -> float:
  """Peak resident memory of this process since it started (its exec), in MiB.

  VmHWM belongs to the address space, which exec replaces; ru_maxrss does not start
  afresh at exec on Linux, so a child of a big process would report the parent's size.
  """
  try:
    with open("/proc/self/status") as f:
      for line in f:
        if line.startswith("VmHWM:"):
          return int(line.split()[1]) / 1024.0  # kB
  except OSError:
    pass
  scale = 1 if sys.platform == "darwin" else 1024  # bytes on macOS, KiB on Linux
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale / MIB


class MemoryMeter:
  """Peak memory of one phase: device counters on GPU, sampled resident set on CPU.

  Use as a context manager around the phase; `result()` afterwards.

  Args:
    device_peak: returns the device's peak bytes (after resetting it where the framework
      can), or None where the device keeps no such counter (CPU).
    interval_s: how often the resident set is sampled.
  """

  def __init__(
    self, device_peak: Callable[[], int | None] | None = None, interval_s: float = 0.005
  ):
    self._device_peak = device_peak
    self._interval = interval_s
    self._stop = threading.Event()
    self._thread: threading.Thread | None = None
    self._start = self._peak = self._end = 0
    self._maxrss_start = 0
    self._process = psutil.Process() if psutil is not None else None

  def rss(self) -> int:
    """Current resident set in bytes (0 without psutil)."""
    return self._process.memory_info().rss if self._process is not None else 0

  @staticmethod
  def maxrss() -> int:
    """Lifetime peak resident set of the process in bytes (ru_maxrss is KiB on Linux)."""
    scale = 1 if sys.platform == "darwin" else 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale

  def _sample(self) -> None:
    while not self._stop.wait(self._interval):
      self._peak = max(self._peak, self.rss())

  def __enter__(self) -> MemoryMeter:
    gc.collect()
    self._start = self._peak = self.rss()
    self._maxrss_start = self.maxrss()
    if psutil is not None:
      self._thread = threading.Thread(target=self._sample, name="rss-sampler", daemon=True)
      self._thread.start()
    return self

  def __exit__(self, *exc) -> None:
    self._stop.set()
    if self._thread is not None:
      self._thread.join()
    self._end = self.rss()
    self._peak = max(self._peak, self._end)

  def result(self) -> dict[str, Any]:
    """Figures in MiB; `peak_mib` is the one the tables show."""
    device = self._device_peak() if self._device_peak is not None else None
    if device is not None:
      return {"kind": "device peak", "peak_mib": device / MIB}
    if psutil is None:
      # Only the lifetime peak is known: its growth during the phase, if any.
      growth = max(self.maxrss() - self._maxrss_start, 0)
      return {"kind": "process maxrss growth", "peak_mib": growth / MIB}
    return {
      "kind": "RSS growth",
      "peak_mib": (self._peak - self._start) / MIB,
      "rss_start_mib": self._start / MIB,
      "rss_peak_mib": self._peak / MIB,
      "rss_end_mib": self._end / MIB,
    }


def jax_device_peak() -> int | None:
  """Largest `peak_bytes_in_use` over the local devices, or None on CPU.

  JAX cannot reset the counter, so it is the process's peak so far, not the phase's.
  """
  stats = [d.memory_stats() for d in jax.local_devices()]
  peaks = [s["peak_bytes_in_use"] for s in stats if s and "peak_bytes_in_use" in s]
  return max(peaks) if peaks else None
