"""Reading patches from a volume: slab reflection, whole-batch tensorstore reads, prefetch.

Reading follows the whole-batch pattern of connectomics' `TensorLoader`: every read of a
batch is issued at once in one `tensorstore.Batch`, then gathered, while `workers`
threads cast, normalise and augment the patches in parallel. `Prefetcher` is the one
background thread and bounded queue of the package: the slab loader keeps `prefetch`
batches ready with it, and any other producer (e.g. segmentation's block reader) can run
through it too. An exception in a producer is raised again in the consumer.
"""

from __future__ import annotations

import concurrent.futures
import queue
import threading
from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING, Any

import numpy as np
import tensorstore as ts

from fibseg_jax.data import augment
from fibseg_jax.data import volume as volume_lib

if TYPE_CHECKING:
  from fibseg_jax.data.plans import PatchPlan
  from fibseg_jax.data.split import Split

IGNORE_LABEL = volume_lib.IGNORE_LABEL


def slab_indices(center: int, slices: int, depth: int) -> np.ndarray:
  """Slice indices of a slab centred on `center`, reflected at the ends of the stack.

  Reflection does not repeat the edge slice (numpy's ``mode="reflect"``) and repeats as
  often as needed, so any slab depth works on any stack.

  Args:
    center: central slice index, 0 <= center < depth.
    slices: slab depth S (odd).
    depth: number of slices of the stack.

  Returns:
    [slices] int64 slice indices, all in 0..depth-1.
  """
  z = center + np.arange(slices, dtype=np.int64) - slices // 2
  if depth == 1:
    return np.zeros_like(z)
  period = 2 * (depth - 1)
  z = np.mod(z, period)
  return np.where(z >= depth, period - z, z)


_DONE = object()


class Prefetcher:
  """Iterates `produce(key)` over `keys`, computed `depth` items ahead in a daemon thread.

  With `produce=None` the items are those of `keys` itself, so any iterator (a
  generator that reads and caches, say) runs in the background thread as it is. An
  exception raised by the producer is raised again by `__next__`, with its traceback.
  `close()` stops the thread and drops what was read ahead; it is also called on
  exhaustion and on error.
  """

  def __init__(
    self,
    produce: Callable[[Any], Any] | None,
    keys: Iterable[Any],
    depth: int,
    *,
    name: str = "slab-prefetch",
  ):
    if depth < 1:
      raise ValueError(f"prefetch depth must be >= 1, got {depth}")
    self._queue: queue.Queue = queue.Queue(maxsize=depth)
    self._stop = threading.Event()
    self._thread = threading.Thread(
      target=self._run, args=(produce, iter(keys)), name=name, daemon=True
    )
    self._thread.start()

  def _run(self, produce: Callable[[Any], Any] | None, keys: Iterator[Any]) -> None:
    try:
      for key in keys:
        if self._stop.is_set():
          return
        self._put((True, key if produce is None else produce(key)))
      self._put((True, _DONE))
    except BaseException as e:  # noqa: BLE001 - handed to the consumer, not swallowed
      self._put((False, e))

  def _put(self, item: tuple[bool, Any]) -> None:
    while not self._stop.is_set():
      try:
        self._queue.put(item, timeout=0.05)
        return
      except queue.Full:
        continue

  def __iter__(self) -> Prefetcher:
    return self

  def __next__(self) -> Any:
    if self._stop.is_set() and self._queue.empty():
      raise StopIteration
    ok, value = self._queue.get()
    if not ok:
      self.close()
      raise value
    if value is _DONE:
      self.close()
      raise StopIteration
    return value

  @property
  def running(self) -> bool:
    return self._thread.is_alive()

  def close(self) -> None:
    """Stops the producer thread and drops what it had read ahead."""
    self._stop.set()
    while True:
      try:
        self._queue.get_nowait()
      except queue.Empty:
        break
    if self._thread is not threading.current_thread():
      self._thread.join(timeout=10)


class PatchReader:
  """Reads, normalises and augments the patches of a `PatchPlan` from a volume.

  Attributes:
    volume: the volume read.
    slices, patch: slab depth and y-x side of a patch.
  """

  def __init__(
    self,
    volume: volume_lib.Volume,
    channels: tuple[str, ...],
    channel_index: list[int],
    *,
    slices: int,
    patch: int,
    workers: int,
    teacher: ts.TensorStore | None = None,
  ):
    self.volume = volume
    self.slices = slices
    self.patch = patch
    self._channels = len(channels)
    self._channel_index = channel_index
    self._offset, self._scale = volume.normalization(channels)
    self._workers = workers
    self._teacher = teacher
    self._pool: concurrent.futures.ThreadPoolExecutor | None = None
    self._pool_lock = threading.Lock()

  def read(self, plan: PatchPlan, split: Split | None) -> dict[str, np.ndarray]:
    """Reads and augments the patches of a plan (labels 255 outside each patch's `own`).

    Args:
      plan: the patches.
      split: its validation pixels read 255 too (training); None keeps them (validation).

    Returns:
      {"image": float32 [n, slices, patch, patch, channels],
       "labels": uint8 [n, patch, patch], 255 = ignore}.
    """
    n, s, p, c = len(plan), self.slices, self.patch, self._channels
    image = np.zeros((n, s, p, p, c), np.float32)
    labels = np.full((n, p, p), IGNORE_LABEL, np.uint8)
    pending = []
    with ts.Batch() as batch:
      for i in range(n):
        z = int(plan.z[i])
        if z < 0:
          continue
        ya, yb, xa, xb = self._window(plan, i)
        labels_read = self.volume.labels[z, ya:yb, xa:xb].read(batch=batch)
        pending.append((i, *self._read_slab(z, ya, yb, xa, xb, batch), labels_read))

    def finish(entry: tuple[int, np.ndarray, ts.Future, ts.Future]) -> None:
      i, zi, image_future, labels_future = entry
      z = int(plan.z[i])
      ya, yb, xa, xb = self._window(plan, i)
      slab = self._slab(zi, image_future)
      lab = labels_future.result()
      # Labels outside the patch's own region (a validation tile's share) and in the
      # validation blocks read 255 before any resampling, which only copies labels.
      oy0, oy1, ox0, ox1 = (int(v) for v in plan.own[i])
      keep = np.zeros(lab.shape, bool)
      keep[max(oy0 - ya, 0) : max(oy1 - ya, 0), max(ox0 - xa, 0) : max(ox1 - xa, 0)] = True
      if split is not None:
        keep &= ~split.val_pixels(z, ya, yb, xa, xb)
      lab = np.where(keep, lab, np.uint8(IGNORE_LABEL))
      symmetry = plan.symmetry(i)
      warp = plan.warp(i)
      if not warp.identity:
        slab, lab = augment.warp_slab(slab, lab, self._coordinates(plan, i), (ya, xa), IGNORE_LABEL)
      # Geometry on views (of the raw data when not resampled), so the cast to float32
      # is the only copy.
      image[i] = augment.apply(slab, symmetry, y_axis=1, slab_axis=0)
      labels[i] = augment.apply(lab, symmetry, y_axis=0)
      self._intensity(image[i], plan, i)

    self._each(finish, pending)
    return {"image": image, "labels": labels}

  def read_unlabelled(self, plan: PatchPlan) -> dict[str, np.ndarray]:
    """Reads the images of a plan, without any label, as a weak and a strong view.

    Returns:
      {"weak": float32 [n, slices, patch, patch, channels] normalised, moved by the plan's
       flips, turns and slab reversal; "strong": the same with the plan's intensity jitter},
      and with a teacher also "teacher": float32 [n, patch, patch, classes], its
      probabilities of the central slice moved with the image (nearest where warped),
      each pixel's summing to 1, or to 0 outside the volume and where it wrote none.
    """
    n, s, p, c = len(plan), self.slices, self.patch, self._channels
    weak = np.zeros((n, s, p, p, c), np.float32)
    strong = np.zeros_like(weak)
    teacher = None
    if self._teacher is not None:
      teacher = np.zeros((n, p, p, self._teacher.shape[-1]), np.float32)
    pending = []
    with ts.Batch() as batch:
      for i in range(n):
        z, window = int(plan.z[i]), self._window(plan, i)
        taught = None
        if teacher is not None:
          ya, yb, xa, xb = window
          taught = self._teacher[z, ya:yb, xa:xb].read(batch=batch)
        pending.append((i, *self._read_slab(z, *window, batch), taught))
    none = np.ones(c, np.float32), np.zeros(c, np.float32), np.ones(c, np.float32)

    def finish(entry: tuple[int, np.ndarray, ts.Future, ts.Future | None]) -> None:
      i, zi, future, taught = entry
      slab = self._slab(zi, future)
      probs = None if taught is None else taught.result()
      if not plan.warp(i).identity:
        ya, _, xa, _ = self._window(plan, i)
        at = self._coordinates(plan, i)
        slab, _ = augment.warp_slab(slab, None, at, (ya, xa), 0)
        if probs is not None:
          probs = augment.nearest(probs, at[s // 2], (ya, xa), 0)
      symmetry = plan.symmetry(i)
      slab = augment.apply(slab, symmetry, y_axis=1, slab_axis=0)
      weak[i] = slab
      augment.intensity(weak[i], self._offset, self._scale, *none)
      strong[i] = slab
      self._intensity(strong[i], plan, i)
      if probs is not None:
        moved = augment.apply(probs, symmetry, y_axis=0).astype(np.float32)
        total = moved.sum(axis=-1, keepdims=True)
        teacher[i] = np.divide(moved, total, out=np.zeros_like(moved), where=total > 0)

    self._each(finish, pending)
    out = {"weak": weak, "strong": strong}
    if teacher is not None:
      out["teacher"] = teacher
    return out

  def _window(self, plan: PatchPlan, i: int) -> tuple[int, int, int, int]:
    """(ya, yb, xa, xb): the y-x window of the volume patch i reads."""
    y0, x0, p = int(plan.y0[i]), int(plan.x0[i]), self.patch
    warp = plan.warp(i)
    if warp.identity:
      return y0, y0 + p, x0, x0 + p
    return augment.warp_window(warp, y0, x0, p, self.volume.shape[1:])

  def _coordinates(self, plan: PatchPlan, i: int) -> np.ndarray:
    """[slices, 2, patch, patch] volume positions the warped patch i reads."""
    c = (self.patch - 1) / 2
    at = augment.warp_coordinates(plan.warp(i), self.patch, self.slices)
    at[:, 0] += plan.y0[i] + c
    at[:, 1] += plan.x0[i] + c
    return at

  def _intensity(self, x: np.ndarray, plan: PatchPlan, i: int) -> None:
    """Normalises patch i of a plan and applies its intensity augmentation, in place."""
    jitter = plan.jitter(i)
    augment.intensity(
      x, self._offset, self._scale, jitter.gain, jitter.offset, jitter.gamma, jitter.invert
    )
    if augment.degrades(jitter):
      augment.degrade(
        x,
        jitter,
        angle=float(plan.angle[i]),
        field_seed=int(plan.field_seed[i]),
        symmetry=plan.symmetry(i),
      )

  def _each(self, finish: Callable[[Any], None], pending: list[Any]) -> None:
    if self._workers > 1 and len(pending) > 1:
      # list() waits for every sample and raises the first error.
      list(self._pool_of_workers().map(finish, pending))
    else:
      for entry in pending:
        finish(entry)

  def _read_slab(
    self, z: int, ya: int, yb: int, xa: int, xb: int, batch: ts.Batch
  ) -> tuple[np.ndarray, ts.Future]:
    """Issues the read of the slab centred on z in a y-x window: (its slice order, future)."""
    zs = slab_indices(z, self.slices, self.volume.shape[0])
    lo, hi = int(zs.min()), int(zs.max()) + 1
    return zs - lo, self.volume.image[lo:hi, ya:yb, xa:xb].read(batch=batch)

  def _slab(self, zi: np.ndarray, future: ts.Future) -> np.ndarray:
    """The slab of a `_read_slab`: slices in slab order, the config's channels (views
    where no reordering is needed)."""
    slab = future.result()
    if len(zi) != len(slab) or (zi != np.arange(len(slab))).any():
      slab = slab[zi]
    if self._channel_index != list(range(len(self.volume.channels))):
      slab = slab[..., self._channel_index]
    return slab

  def _pool_of_workers(self) -> concurrent.futures.ThreadPoolExecutor:
    with self._pool_lock:
      if self._pool is None:
        self._pool = concurrent.futures.ThreadPoolExecutor(
          self._workers, thread_name_prefix="slab-augment"
        )
      return self._pool

  def close(self) -> None:
    """Stops the worker threads."""
    with self._pool_lock:
      if self._pool is not None:
        self._pool.shutdown(wait=True, cancel_futures=True)
        self._pool = None
