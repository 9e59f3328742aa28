"""Slab loader: training and validation patches around the annotated slices of a volume.

A sample is a slab of `slices` consecutive sections centred on an annotated slice, cut to
a `patch` x `patch` window in y-x, with the named channels normalised by the volume's
stored percentiles, and the labels of the central slice:

  image  float32 [batch, slices, patch, patch, channels]
  labels uint8   [batch, patch, patch], 255 (`IGNORE_LABEL`) = no label here

Near the ends of the stack the slab is reflected without repeating the edge slice (numpy's
``mode="reflect"``): centre 0 of a 5-slice slab reads slices [2, 1, 0, 1, 2]; see
`slab_indices`, which whole-volume inference should use too.

Split (the paper's): the annotated area of every annotated slice is cut into square
`val_block` x `val_block` blocks, and whole blocks are drawn, over all annotated slices
jointly and deterministically from `seed`, until they hold as close as possible to
`val_fraction` of the annotated pixels. Those blocks are the validation region; their
labels read 255 in every training batch. Slices named in `eval_slices` are held out
altogether: they are never the centre of a patch and their labels are never read, though
their images may be read as slab context of a neighbouring annotated slice (they are
images of the same sample, like any other unannotated section).

Training stream: global batch k is a pure function of (seed, k), so the loader's position
is the step number: `batches(start_step=k)` after a restart yields exactly what an
uninterrupted run would have yielded from step k on. Every process computes the whole
global batch plan (coordinates and augmentation parameters, cheap) and reads only its
share, rows [process_index * local : (process_index + 1) * local]. Patch centres are drawn
so that every patch holds training pixels: a sampling cell (at most `patch` on a side,
nested in the validation blocks) is drawn with probability proportional to its number of
training pixels, then the patch is placed uniformly among the positions that contain the
whole cell.

Unlabelled patches (`unlabelled_batch` > 0, for semi-supervised training): batch k also
holds patches centred on slices drawn uniformly from the whole stack, at uniform y-x
positions, from the same (seed, k) on a separate random stream. Only their images are
read, never a label, so evaluation slices' images are used as a user's would be and their
labels stay unseen. Each comes as two views with the same geometry: "weak" (normalised
only) and "strong" (with the intensity jitter).

Reading follows the whole-batch pattern of connectomics' `TensorLoader`: every read of a
batch is issued at once in one `tensorstore.Batch`, then gathered, while a daemon thread
keeps `prefetch` batches ready and `workers` threads cast, normalise and augment the
patches of a batch in parallel. An exception in those threads is raised again in the
consumer. Close the loader (or use it as a context manager) to stop the threads.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import itertools
import math
import queue
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

import jax
import numpy as np
import tensorstore as ts

from fibseg_jax.data import volume as volume_lib

IGNORE_LABEL = volume_lib.IGNORE_LABEL

# How each LoaderConfig field is spelled on the command line, for error messages.
FLAGS: Mapping[str, str] = {
  "channels": "--config.data.channels",
  "slices": "--config.data.slices",
  "patch": "--config.data.patch",
  "batch_size": "--config.train.batch_size",
  "val_fraction": "--config.data.val_fraction",
  "val_block": "--config.data.val_block",
  "eval_slices": "--config.data.eval_slices",
  "gain": "--config.data.gain",
  "offset": "--config.data.offset",
  "gamma": "--config.data.gamma",
  "prefetch": "--config.data.prefetch",
  "workers": "--config.data.workers",
  "size_multiple": "--config.model (its size multiple)",
  "unlabelled_batch": "--config.semi.batch_size",
}

# Region codes of `SlabLoader.split_masks`.
REGION_UNLABELLED = 0
REGION_TRAIN = 1
REGION_VALIDATION = 2
REGION_EVALUATION = 3

# Separate random streams, so the split never shifts when batch drawing changes.
_SPLIT_STREAM = 0
_TRAIN_STREAM = 1
_UNLABELLED_STREAM = 2


class LoaderError(ValueError):
  """A loader setting does not fit the volume or the run."""


@dataclasses.dataclass(frozen=True)
class LoaderConfig:
  """What the slab loader reads and how it augments.

  Attributes:
    channels: channel names to read, in model input order, e.g. ("ICE", "TLD").
    slices: slab depth S, odd; the label is that of the central slice.
    patch: y-x side of a patch in pixels; a multiple of `size_multiple`.
    batch_size: global batch size, summed over all processes.
    val_fraction: share of the annotated area held out for validation, in [0, 1).
    val_block: side of the square y-x blocks of the validation split, in pixels.
    eval_slices: slices held out for evaluation: never trained or validated on.
    augment: master switch for every augmentation below.
    flips: random flips along y and x.
    rot90: random multiples of 90 degrees in the y-x plane.
    gain: per-channel multiplicative jitter; factor drawn from [1 - gain, 1 + gain].
    offset: per-channel additive jitter on the normalised image, from [-offset, offset].
    gamma: per-channel gamma jitter; exponent drawn from [1 - gamma, 1 + gamma].
    reverse_slab: randomly reverse the order of the slices of a slab.
    seed: seed of the training stream (and of the split unless `split_seed` is set).
    split_seed: seed of the validation split; None uses `seed`. Fix it to compare
      models or seeds on the same held-out blocks.
    prefetch: batches read ahead by a background thread; 0 reads in the caller's thread.
    workers: threads that cast, normalise and augment the patches of a batch in parallel
      (numpy releases the GIL); 1 does it in the reading thread.
    size_multiple: the model's required multiple of the patch size (e.g. 2**depth).
    unlabelled_batch: global number of unlabelled patches per training batch, drawn
      from any slice of the stack (images only; no label is read); 0 draws none.
  """

  channels: tuple[str, ...]
  slices: int
  patch: int
  batch_size: int
  val_fraction: float = 0.25
  val_block: int = 128
  eval_slices: tuple[int, ...] = ()
  augment: bool = True
  flips: bool = True
  rot90: bool = True
  gain: float = 0.1
  offset: float = 0.1
  gamma: float = 0.2
  reverse_slab: bool = True
  seed: int = 0
  split_seed: int | None = None
  prefetch: int = 2
  workers: int = 4
  size_multiple: int = 1
  unlabelled_batch: int = 0

  def __post_init__(self):
    # Accept "ICE,TLD" and lists from a command line or a ConfigDict.
    channels = self.channels
    if isinstance(channels, str):
      channels = [c.strip() for c in channels.split(",") if c.strip()]
    object.__setattr__(self, "channels", tuple(channels))
    eval_slices = self.eval_slices
    if isinstance(eval_slices, int):
      eval_slices = (eval_slices,)
    object.__setattr__(self, "eval_slices", tuple(eval_slices))


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


def _is_int(value: Any) -> bool:
  return isinstance(value, int | np.integer) and not isinstance(value, bool)


def _check_int(config: LoaderConfig, name: str, minimum: int) -> int:
  value = getattr(config, name)
  if not _is_int(value) or value < minimum:
    raise LoaderError(f"{FLAGS[name]}={value!r}: must be an integer >= {minimum}")
  return int(value)


def validate_config(
  config: LoaderConfig, volume: volume_lib.Volume, process_count: int = 1
) -> list[int]:
  """Checks a loader config against a volume, without reading any voxel.

  Args:
    config: the loader settings.
    volume: the opened volume.
    process_count: number of JAX processes that share each global batch.

  Returns:
    The volume's channel indices of `config.channels`.

  Raises:
    LoaderError (a ValueError) or VolumeError: naming the flag, the volume and the
      expected value.
  """
  where = volume_lib.describe(volume.root)
  depth, height, width = volume.shape
  if not config.channels:
    raise LoaderError(f"{FLAGS['channels']} is empty; name some of {list(volume.channels)}")
  if len(set(config.channels)) != len(config.channels):
    raise LoaderError(f"{FLAGS['channels']}={list(config.channels)} names a channel twice")
  channel_index = volume.channel_indices(config.channels, flag=FLAGS["channels"])

  slices = _check_int(config, "slices", 1)
  if slices % 2 == 0:
    raise LoaderError(f"{FLAGS['slices']}={slices}: must be odd (1, 3, 5, ...)")

  multiple = _check_int(config, "size_multiple", 1)
  patch = _check_int(config, "patch", 1)
  if patch > min(height, width):
    raise LoaderError(
      f"{FLAGS['patch']}={patch} is larger than the volume's y-x size ({height}, {width}) "
      f"of {where}"
    )
  if patch % multiple:
    below, above = patch // multiple * multiple, (patch // multiple + 1) * multiple
    nearest = [n for n in (below, above) if 0 < n <= min(height, width)]
    raise LoaderError(
      f"{FLAGS['patch']}={patch} must be a multiple of {multiple} for this model "
      f"(nearest valid: {', '.join(map(str, nearest)) or 'none fits this volume'})"
    )

  batch = _check_int(config, "batch_size", 1)
  if batch % process_count:
    raise LoaderError(
      f"{FLAGS['batch_size']}={batch} must be divisible by the number of processes "
      f"({process_count})"
    )

  unlabelled = _check_int(config, "unlabelled_batch", 0)
  if unlabelled % process_count:
    raise LoaderError(
      f"{FLAGS['unlabelled_batch']}={unlabelled} must be divisible by the number of "
      f"processes ({process_count})"
    )

  fraction = config.val_fraction
  if not isinstance(fraction, int | float) or not 0 <= fraction < 1:
    raise LoaderError(f"{FLAGS['val_fraction']}={fraction!r}: must be in [0, 1)")
  _check_int(config, "val_block", 1)
  _check_int(config, "prefetch", 0)
  _check_int(config, "workers", 1)
  for name in ("gain", "gamma"):
    value = getattr(config, name)
    if not isinstance(value, int | float) or not 0 <= value < 1:
      raise LoaderError(f"{FLAGS[name]}={value!r}: must be in [0, 1)")
  if not isinstance(config.offset, int | float) or config.offset < 0:
    raise LoaderError(f"{FLAGS['offset']}={config.offset!r}: must be >= 0")

  bad = [z for z in config.eval_slices if not _is_int(z) or not 0 <= z < depth]
  if bad:
    raise LoaderError(
      f"{FLAGS['eval_slices']}: slice(s) {bad} outside the volume's slices 0..{depth - 1}"
    )
  annotated = set(volume.metadata.annotated_slices)
  unlabelled = [z for z in config.eval_slices if z not in annotated]
  if unlabelled:  # evaluating there would score against nothing
    which = (
      f"slice {unlabelled[0]} has"
      if len(unlabelled) == 1
      else f"slices {', '.join(map(str, unlabelled))} have"
    )
    raise LoaderError(
      f"{FLAGS['eval_slices']}={','.join(map(str, config.eval_slices))}: {which} no labels; "
      + (
        f"annotated slices are {', '.join(map(str, sorted(annotated)))}"
        if annotated
        else f"volume {where} has no annotated slices"
      )
    )
  if not annotated - set(config.eval_slices):
    if not annotated:
      raise LoaderError(f"volume {where} has no annotated slices")
    raise LoaderError(
      f"volume {where} has no annotated slices outside {FLAGS['eval_slices']}="
      f"{list(config.eval_slices)} (annotated: {sorted(annotated)})"
    )
  return channel_index


@dataclasses.dataclass(frozen=True)
class PatchPlan:
  """Where the patches of a batch come from and how they are augmented.

  Attributes (all with a leading [n] patch axis):
    z: central slice; -1 marks a padding entry (zero image, all-255 labels).
    y0, x0: top-left corner of the patch in the volume.
    own: [n, 4] (y0, y1, x0, x1) volume region whose labels the patch keeps; labels
      outside it read 255 (validation tiles own exactly their share of a block).
    flip_y, flip_x, reverse: bool flips of y, x and the slice order.
    rot90: number of counter-clockwise quarter turns in y-x, 0..3.
    gain, offset, gamma: [n, channels] intensity jitter.
  """

  z: np.ndarray
  y0: np.ndarray
  x0: np.ndarray
  own: np.ndarray
  flip_y: np.ndarray
  flip_x: np.ndarray
  rot90: np.ndarray
  reverse: np.ndarray
  gain: np.ndarray
  offset: np.ndarray
  gamma: np.ndarray

  def __len__(self) -> int:
    return len(self.z)

  def rows(self, start: int, stop: int) -> PatchPlan:
    """The plan of patches start..stop-1 (one process's share)."""
    return PatchPlan(
      **{f.name: getattr(self, f.name)[start:stop] for f in dataclasses.fields(self)}
    )

  @classmethod
  def identity(
    cls, z: np.ndarray, y0: np.ndarray, x0: np.ndarray, own: np.ndarray, channels: int
  ) -> PatchPlan:
    """A plan without augmentation."""
    n = len(z)
    false = np.zeros(n, bool)
    return cls(
      z=z,
      y0=y0,
      x0=x0,
      own=own,
      flip_y=false,
      flip_x=false,
      rot90=np.zeros(n, np.int64),
      reverse=false,
      gain=np.ones((n, channels), np.float32),
      offset=np.zeros((n, channels), np.float32),
      gamma=np.ones((n, channels), np.float32),
    )


_DONE = object()


class Prefetcher:
  """Iterates `produce(key)` over `keys`, computed `depth` items ahead in a daemon thread.

  An exception raised by `produce` is raised again by `__next__`, with its traceback.
  `close()` stops the thread; it is also called on exhaustion and on error.
  """

  def __init__(self, produce: Callable[[Any], Any], keys: Iterable[Any], depth: int):
    if depth < 1:
      raise ValueError(f"prefetch depth must be >= 1, got {depth}")
    self._queue: queue.Queue = queue.Queue(maxsize=depth)
    self._stop = threading.Event()
    self._thread = threading.Thread(
      target=self._run, args=(produce, iter(keys)), name="slab-prefetch", daemon=True
    )
    self._thread.start()

  def _run(self, produce: Callable[[Any], Any], keys: Iterator[Any]) -> None:
    try:
      for key in keys:
        if self._stop.is_set():
          return
        self._put((True, produce(key)))
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
    """Stops the reader thread and drops what it had read ahead."""
    self._stop.set()
    while True:
      try:
        self._queue.get_nowait()
      except queue.Empty:
        break
    if self._thread is not threading.current_thread():
      self._thread.join(timeout=10)


def _axis_cuts(size: int, block: int, patch: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Block and sampling-cell boundaries along one axis.

  Returns:
    (block_cuts [nb + 1], cell_cuts [nc + 1], cell_block [nc]): cells split each block
    into equal parts no longer than `patch`, so a patch can always contain a whole cell.
  """
  block_cuts = np.append(np.arange(0, size, block), size)
  cells, owner = [], []
  for b, (lo, hi) in enumerate(itertools.pairwise(block_cuts)):
    parts = math.ceil((hi - lo) / patch)
    cells.extend(lo + (np.arange(parts) * (hi - lo)) // parts)
    owner.extend([b] * parts)
  return block_cuts, np.append(np.asarray(cells, np.int64), size), np.asarray(owner, np.int64)


class SlabLoader:
  """Training and validation batches of slabs around the annotated slices of a volume.

  Construction validates the config against the volume and reads the labels of the
  annotated slices once (one slice at a time) to split them and count pixels; nothing
  else is kept in memory.

  Example:
    with SlabLoader(open_volume("vol.zarr"), config) as loader:
      weights = class_weights(loader.class_counts())
      for step, batch in zip(range(start, steps), loader.batches(start_step=start)):
        ...  # batch["image"]: [local_batch, S, P, P, C], batch["labels"]: [local_batch, P, P]

  Attributes:
    config: the settings.
    volume: the volume read.
    process_index, process_count: this process and how many share each global batch.
    local_batch_size: rows of each batch read by this process.
    train_slices: annotated slices used for training and validation (eval slices left out).
    train_area, val_area: labelled training and validation pixels.
  """

  def __init__(
    self,
    volume: volume_lib.Volume | str,
    config: LoaderConfig,
    *,
    process_index: int | None = None,
    process_count: int | None = None,
  ):
    if not isinstance(volume, volume_lib.Volume):
      volume = volume_lib.open_volume(volume)
    self.volume = volume
    self.config = config
    self.process_count = jax.process_count() if process_count is None else int(process_count)
    self.process_index = jax.process_index() if process_index is None else int(process_index)
    if not 0 <= self.process_index < self.process_count:
      raise LoaderError(f"process_index={self.process_index} outside 0..{self.process_count - 1}")
    self._channel_index = validate_config(config, volume, self.process_count)
    self._where = volume_lib.describe(volume.root)
    self.local_batch_size = config.batch_size // self.process_count
    self._offset, self._scale = volume.normalization(config.channels)
    self.train_slices = tuple(
      sorted(set(volume.metadata.annotated_slices) - set(config.eval_slices))
    )
    _, height, width = volume.shape
    block, patch = config.val_block, config.patch
    self._block_y, self._cell_y, self._cell_block_y = _axis_cuts(height, block, patch)
    self._block_x, self._cell_x, self._cell_block_x = _axis_cuts(width, block, patch)
    self._cell_counts = np.stack([self._count_cells(z) for z in self.train_slices])
    self._split()
    self._open: set[Prefetcher] = set()
    self._pool: concurrent.futures.ThreadPoolExecutor | None = None
    self._pool_lock = threading.Lock()
    self._validation_plan: PatchPlan | None = None

  # Construction: pixel counts and the split.

  def _count_cells(self, z: int) -> np.ndarray:
    """[cells_y, cells_x, classes] labelled-pixel counts of slice z."""
    k = len(self.volume.classes)
    labels = self.volume.read_labels(z)
    cells_x = len(self._cell_x) - 1
    column_cell = (np.searchsorted(self._cell_x, np.arange(labels.shape[1]), "right") - 1) * (k + 1)
    counts = []
    for y0, y1 in itertools.pairwise(self._cell_y):
      # Class k+1 collects 255 (and anything out of range), then is dropped.
      key = column_cell[None, :] + np.minimum(labels[y0:y1], k)
      counts.append(np.bincount(key.ravel(), minlength=cells_x * (k + 1)).reshape(cells_x, k + 1))
    return np.stack(counts)[..., :k]

  def _blocks_of_cells(self, cells: np.ndarray) -> np.ndarray:
    """Sums [..., cells_y, cells_x, ...] counts into [..., blocks_y, blocks_x, ...]."""
    first_y = np.searchsorted(self._cell_block_y, np.arange(len(self._block_y) - 1))
    first_x = np.searchsorted(self._cell_block_x, np.arange(len(self._block_x) - 1))
    return np.add.reduceat(np.add.reduceat(cells, first_y, axis=1), first_x, axis=2)

  def _split(self) -> None:
    config = self.config
    block_counts = self._blocks_of_cells(self._cell_counts)  # [slices, by, bx, classes]
    areas = block_counts.sum(-1)
    total = int(areas.sum())
    if total == 0:
      raise LoaderError(
        f"volume {self._where}: annotated slices {list(self.train_slices)} hold no labels "
        f"(every pixel is {IGNORE_LABEL})"
      )
    val = np.zeros(areas.shape, bool)
    if config.val_fraction > 0:
      target = config.val_fraction * total
      split_seed = config.seed if config.split_seed is None else config.split_seed
      rng = np.random.default_rng([split_seed, _SPLIT_STREAM])
      taken = 0
      for i in rng.permutation(np.flatnonzero(areas > 0)):
        a = areas.flat[i]
        if abs(taken + a - target) < abs(taken - target):
          val.flat[i] = True
          taken += a
      if taken == 0 or taken == total:
        raise LoaderError(
          f"{FLAGS['val_block']}={config.val_block} is too coarse to hold out "
          f"{FLAGS['val_fraction']}={config.val_fraction} of the {total} annotated pixels "
          f"of volume {self._where} ({int((areas > 0).sum())} non-empty blocks); lower "
          f"{FLAGS['val_block']}, or set {FLAGS['val_fraction']}=0"
        )
    self._val_blocks = val  # [slices, blocks_y, blocks_x]
    self._class_counts = block_counts[~val].sum(0).astype(np.int64)
    self.val_area = int(areas[val].sum())
    self.train_area = total - self.val_area
    in_val = val[:, self._cell_block_y][:, :, self._cell_block_x]
    cell_area = np.where(in_val, 0, self._cell_counts.sum(-1))
    self._cells = np.flatnonzero(cell_area)
    self._cell_cumsum = np.cumsum(cell_area.ravel()[self._cells])
    self._cells_shape = cell_area.shape

  # Public summaries.

  @property
  def global_batch_size(self) -> int:
    return self.config.batch_size

  def class_counts(self) -> np.ndarray:
    """[classes] int64 label histogram of the training pixels (validation blocks excluded)."""
    return self._class_counts.copy()

  def validation_blocks(self) -> list[tuple[int, int, int, int, int]]:
    """The validation blocks as (z, y0, y1, x0, x1), in slice then raster order."""
    out = []
    for s, by, bx in zip(*np.nonzero(self._val_blocks), strict=True):
      out.append(
        (
          self.train_slices[s],
          int(self._block_y[by]),
          int(self._block_y[by + 1]),
          int(self._block_x[bx]),
          int(self._block_x[bx + 1]),
        )
      )
    return out

  def split_masks(self) -> dict[int, np.ndarray]:
    """Region of every labelled pixel of the annotated slices (reads their labels).

    Returns:
      {z: [y, x] uint8} with REGION_TRAIN, REGION_VALIDATION, REGION_EVALUATION for
      labelled pixels of training, validation and evaluation slices, REGION_UNLABELLED
      elsewhere.
    """
    masks = {}
    for z in sorted(self.volume.metadata.annotated_slices):
      labelled = self.volume.read_labels(z) != IGNORE_LABEL
      if z in self.config.eval_slices:
        region = np.full(labelled.shape, REGION_EVALUATION, np.uint8)
      else:
        region = np.where(
          self._val_pixels(z, 0, labelled.shape[0], 0, labelled.shape[1]),
          REGION_VALIDATION,
          REGION_TRAIN,
        ).astype(np.uint8)
      masks[z] = np.where(labelled, region, REGION_UNLABELLED).astype(np.uint8)
    return masks

  def summary(self) -> str:
    """One line for the log: slices, areas, split and batch shape."""
    c = self.config
    return (
      f"{self._where}: training slices {list(self.train_slices)}, eval slices "
      f"{list(c.eval_slices)}; {self.train_area} training and {self.val_area} validation "
      f"pixels ({self.val_area / (self.train_area + self.val_area):.1%} in "
      f"{int(self._val_blocks.sum())} blocks of {c.val_block} px); batch "
      f"{self.local_batch_size}/{c.batch_size} x {c.slices} slices x {c.patch}^2 x "
      f"{list(c.channels)}"
    )

  def _val_pixels(self, z: int, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
    """[y1 - y0, x1 - x0] bool: which pixels of a window of slice z are validation pixels."""
    if z not in self.train_slices:
      return np.zeros((y1 - y0, x1 - x0), bool)
    blocks = self._val_blocks[self.train_slices.index(z)]
    by = np.searchsorted(self._block_y, np.arange(y0, y1), "right") - 1
    bx = np.searchsorted(self._block_x, np.arange(x0, x1), "right") - 1
    return blocks[np.ix_(by, bx)]

  # Plans.

  def train_plan(self, step: int) -> PatchPlan:
    """The global plan of training batch `step`: a pure function of (seed, step)."""
    config, n, c = self.config, self.config.batch_size, len(self.config.channels)
    _, height, width = self.volume.shape
    patch = config.patch
    rng = np.random.default_rng([config.seed, _TRAIN_STREAM, int(step)])
    pick = np.searchsorted(self._cell_cumsum, rng.random(n) * self._cell_cumsum[-1], "right")
    s, cy, cx = np.unravel_index(self._cells[pick], self._cells_shape)
    # Any placement that contains the whole cell, clipped to the volume.
    y0 = rng.integers(
      np.maximum(0, self._cell_y[cy + 1] - patch), np.minimum(self._cell_y[cy], height - patch) + 1
    )
    x0 = rng.integers(
      np.maximum(0, self._cell_x[cx + 1] - patch), np.minimum(self._cell_x[cx], width - patch) + 1
    )
    return self._augmented(rng, np.asarray(self.train_slices)[s], y0, x0, c)

  def unlabelled_plan(self, step: int) -> PatchPlan:
    """The global plan of the unlabelled patches of batch `step`: any slice, any place.

    A pure function of (seed, step), on its own random stream, so turning semi-supervised
    training on or off leaves the labelled patches of every step unchanged.
    """
    config, n = self.config, self.config.unlabelled_batch
    depth, height, width = self.volume.shape
    rng = np.random.default_rng([config.seed, _UNLABELLED_STREAM, int(step)])
    z = rng.integers(0, depth, n)
    y0 = rng.integers(0, height - config.patch + 1, n)
    x0 = rng.integers(0, width - config.patch + 1, n)
    return self._augmented(rng, z, y0, x0, len(config.channels))

  def _augmented(
    self, rng: np.random.Generator, z: np.ndarray, y0: np.ndarray, x0: np.ndarray, c: int
  ) -> PatchPlan:
    """A plan of whole patches at (z, y0, x0) with augmentation drawn from rng."""
    config, n, patch = self.config, len(z), self.config.patch
    # Drawn whatever the switches say, so the stream (and the patches) do not depend on them.
    flip_y, flip_x, reverse = rng.random((3, n)) < 0.5
    rot90 = rng.integers(0, 4, n)
    gain = 1 + rng.uniform(-1, 1, (n, c)) * config.gain
    offset = rng.uniform(-1, 1, (n, c)) * config.offset
    gamma = 1 + rng.uniform(-1, 1, (n, c)) * config.gamma
    on = config.augment
    return PatchPlan(
      z=z,
      y0=y0,
      x0=x0,
      own=np.stack([y0, y0 + patch, x0, x0 + patch], axis=1),
      flip_y=flip_y & (on and config.flips),
      flip_x=flip_x & (on and config.flips),
      rot90=rot90 * (on and config.rot90),
      reverse=reverse & (on and config.reverse_slab),
      gain=(gain if on else np.ones_like(gain)).astype(np.float32),
      offset=(offset if on else np.zeros_like(offset)).astype(np.float32),
      gamma=(gamma if on else np.ones_like(gamma)).astype(np.float32),
    )

  def validation_plan(self) -> PatchPlan:
    """The tiling of the validation blocks, padded to whole global batches.

    Each block is cut into the fewest equal tiles no larger than `patch`; each tile is
    read through a patch centred on it (clipped to the volume), so the model sees real
    context around it, and owns exactly its tile's labels. Every validation pixel is
    therefore labelled exactly once over the plan.
    """
    if self._validation_plan is not None:
      return self._validation_plan
    patch = self.config.patch
    _, height, width = self.volume.shape
    z, y0, x0, own = [], [], [], []

    def tiles(lo: int, hi: int, size: int) -> list[tuple[int, int, int]]:
      parts = math.ceil((hi - lo) / patch)
      cuts = lo + (np.arange(parts + 1) * (hi - lo)) // parts
      out = []
      for a, b in itertools.pairwise(cuts.tolist()):
        start = min(max(0, (a + b - patch) // 2), size - patch)
        out.append((start, a, b))
      return out

    for bz, by0, by1, bx0, bx1 in self.validation_blocks():
      for ys, ya, yb in tiles(by0, by1, height):
        for xs, xa, xb in tiles(bx0, bx1, width):
          z.append(bz)
          y0.append(ys)
          x0.append(xs)
          own.append((ya, yb, xa, xb))
    n, batch = len(z), self.config.batch_size
    pad = -n % batch
    z = np.asarray(z + [-1] * pad, np.int64)
    y0 = np.asarray(y0 + [0] * pad, np.int64)
    x0 = np.asarray(x0 + [0] * pad, np.int64)
    own = np.asarray(own + [(0, 0, 0, 0)] * pad, np.int64).reshape(-1, 4)
    self._validation_plan = PatchPlan.identity(z, y0, x0, own, len(self.config.channels))
    return self._validation_plan

  @property
  def num_validation_batches(self) -> int:
    """Global batches in one pass of `validation_batches()`."""
    return len(self.validation_plan()) // self.config.batch_size

  def _share(self, plan: PatchPlan, first: int, local: int | None = None) -> PatchPlan:
    """This process's rows of the global batch starting at plan row `first`."""
    local = self.local_batch_size if local is None else local
    start = first + self.process_index * local
    return plan.rows(start, start + local)

  # Reading.

  def read(self, plan: PatchPlan, *, validation: bool = False) -> dict[str, np.ndarray]:
    """Reads and augments the patches of a plan.

    All reads are issued at once in one tensorstore batch and then gathered.

    Args:
      plan: the patches, e.g. `train_plan(step)` (all rows) or a share of it.
      validation: keep validation-block labels (validation tiles); by default they are
        set to 255 as in training.

    Returns:
      {"image": float32 [n, slices, patch, patch, channels],
       "labels": uint8 [n, patch, patch], 255 = ignore}.
    """
    config, n = self.config, len(plan)
    s, p, c = config.slices, config.patch, len(config.channels)
    image = np.zeros((n, s, p, p, c), np.float32)
    labels = np.full((n, p, p), IGNORE_LABEL, np.uint8)
    pending = []
    with ts.Batch() as batch:
      for i in range(n):
        z, y0, x0 = int(plan.z[i]), int(plan.y0[i]), int(plan.x0[i])
        if z < 0:
          continue
        labels_read = self.volume.labels[z, y0 : y0 + p, x0 : x0 + p].read(batch=batch)
        pending.append((i, *self._read_slab(z, y0, x0, batch), labels_read))

    def finish(entry: tuple[int, np.ndarray, ts.Future, ts.Future]) -> None:
      i, zi, image_future, labels_future = entry
      z, y0, x0 = int(plan.z[i]), int(plan.y0[i]), int(plan.x0[i])
      slab = self._slab(zi, image_future)
      lab = labels_future.result()
      oy0, oy1, ox0, ox1 = (int(v) for v in plan.own[i])
      keep = np.zeros((p, p), bool)
      keep[max(oy0 - y0, 0) : max(oy1 - y0, 0), max(ox0 - x0, 0) : max(ox1 - x0, 0)] = True
      if not validation:
        keep &= ~self._val_pixels(z, y0, y0 + p, x0, x0 + p)
      lab = np.where(keep, lab, np.uint8(IGNORE_LABEL))
      # Geometry on views of the raw data, so the cast to float32 is the only copy.
      slab, lab = _move(slab, lab, plan, i)
      image[i] = slab
      labels[i] = lab
      _intensity(image[i], self._offset, self._scale, plan, i)

    if config.workers > 1 and len(pending) > 1:
      # list() waits for every sample and raises the first error.
      list(self._workers().map(finish, pending))
    else:
      for entry in pending:
        finish(entry)
    return {"image": image, "labels": labels}

  def _read_slab(self, z: int, y0: int, x0: int, batch: ts.Batch) -> tuple[np.ndarray, ts.Future]:
    """Issues the read of the slab centred on z at (y0, x0): (its slice order, future)."""
    p = self.config.patch
    zs = slab_indices(z, self.config.slices, self.volume.shape[0])
    lo, hi = int(zs.min()), int(zs.max()) + 1
    return zs - lo, self.volume.image[lo:hi, y0 : y0 + p, x0 : x0 + p].read(batch=batch)

  def _slab(self, zi: np.ndarray, future: ts.Future) -> np.ndarray:
    """The slab of a `_read_slab`: slices in slab order, the config's channels (views
    where no reordering is needed)."""
    slab = future.result()
    if len(zi) != len(slab) or (zi != np.arange(len(slab))).any():
      slab = slab[zi]
    if self._channel_index != list(range(len(self.volume.channels))):
      slab = slab[..., self._channel_index]
    return slab

  def read_unlabelled(self, plan: PatchPlan) -> dict[str, np.ndarray]:
    """Reads the images of a plan, without any label, as a weak and a strong view.

    Args:
      plan: e.g. (a share of) `unlabelled_plan(step)`.

    Returns:
      {"weak": float32 [n, slices, patch, patch, channels] normalised, moved by the plan's
       flips, turns and slab reversal; "strong": the same with the plan's intensity jitter}.
    """
    config, n = self.config, len(plan)
    s, p, c = config.slices, config.patch, len(config.channels)
    weak = np.zeros((n, s, p, p, c), np.float32)
    strong = np.zeros_like(weak)
    plain = PatchPlan.identity(plan.z, plan.y0, plan.x0, plan.own, c)
    pending = []
    with ts.Batch() as batch:
      for i in range(n):
        z, y0, x0 = int(plan.z[i]), int(plan.y0[i]), int(plan.x0[i])
        pending.append((i, *self._read_slab(z, y0, x0, batch)))

    def finish(entry: tuple[int, np.ndarray, ts.Future]) -> None:
      i, zi, future = entry
      slab, _ = _move(self._slab(zi, future), np.zeros((p, p), np.uint8), plan, i)
      weak[i] = slab
      _intensity(weak[i], self._offset, self._scale, plain, i)
      strong[i] = slab
      _intensity(strong[i], self._offset, self._scale, plan, i)

    if config.workers > 1 and len(pending) > 1:
      list(self._workers().map(finish, pending))
    else:
      for entry in pending:
        finish(entry)
    return {"weak": weak, "strong": strong}

  def _workers(self) -> concurrent.futures.ThreadPoolExecutor:
    with self._pool_lock:
      if self._pool is None:
        self._pool = concurrent.futures.ThreadPoolExecutor(
          self.config.workers, thread_name_prefix="slab-augment"
        )
      return self._pool

  def batches(self, start_step: int = 0) -> Iterator[dict[str, np.ndarray]]:
    """The endless training stream from global step `start_step`, this process's share.

    Yields:
      {"image": float32 [local_batch, slices, patch, patch, channels],
       "labels": uint8 [local_batch, patch, patch]}; validation-block and unannotated
      pixels are 255. With `unlabelled_batch` > 0 also "weak" and "strong":
      [unlabelled_batch / processes, slices, patch, patch, channels] (`read_unlabelled`).
    """
    if not _is_int(start_step) or start_step < 0:
      raise LoaderError(f"start_step={start_step!r}: must be an integer >= 0")
    unlabelled = self.config.unlabelled_batch // self.process_count

    def produce(step: int) -> dict[str, np.ndarray]:
      batch = self.read(self._share(self.train_plan(step), 0))
      if unlabelled:
        batch.update(self.read_unlabelled(self._share(self.unlabelled_plan(step), 0, unlabelled)))
      return batch

    return self._stream(produce, itertools.count(int(start_step)))

  def validation_batches(self) -> Iterator[dict[str, np.ndarray]]:
    """One pass over the validation tiles, this process's share of each global batch.

    Yields `num_validation_batches` dicts shaped like `batches()`; labels are 255
    outside each tile's own part of a validation block, and padding rows (to fill the
    last global batch) are all 255 with a zero image.
    """
    plan = self.validation_plan()
    return self._stream(
      lambda first: self.read(self._share(plan, first), validation=True),
      range(0, len(plan), self.config.batch_size),
    )

  def _stream(self, produce: Callable[[int], Any], keys: Iterable[int]) -> Iterator[Any]:
    if self.config.prefetch == 0:
      return map(produce, keys)
    self._open = {p for p in self._open if p.running}
    prefetcher = Prefetcher(produce, keys, self.config.prefetch)
    self._open.add(prefetcher)
    return prefetcher

  def close(self) -> None:
    """Stops every prefetch and worker thread started by this loader."""
    for prefetcher in self._open:
      prefetcher.close()
    self._open = set()
    with self._pool_lock:
      if self._pool is not None:
        self._pool.shutdown(wait=True, cancel_futures=True)
        self._pool = None

  def __enter__(self) -> SlabLoader:
    return self

  def __exit__(self, *exc) -> None:
    self.close()


def _move(
  slab: np.ndarray, labels: np.ndarray, plan: PatchPlan, i: int
) -> tuple[np.ndarray, np.ndarray]:
  """Slab reversal, flips and quarter turns of sample i of a plan, as views.

  Args:
    slab: [slices, patch, patch, channels].
    labels: [patch, patch].
    plan: the plan; row i says what to do.
    i: the row.

  Returns:
    (slab, labels) moved together.
  """
  if plan.reverse[i]:
    slab = slab[::-1]
  if plan.flip_y[i]:
    slab, labels = slab[:, ::-1], labels[::-1]
  if plan.flip_x[i]:
    slab, labels = slab[:, :, ::-1], labels[:, ::-1]
  if plan.rot90[i]:
    k = int(plan.rot90[i])
    slab, labels = np.rot90(slab, k, axes=(1, 2)), np.rot90(labels, k)
  return slab, labels


def _intensity(
  x: np.ndarray, norm_offset: np.ndarray, norm_scale: np.ndarray, plan: PatchPlan, i: int
) -> None:
  """Normalises and jitters one slab in place.

  x <- (x - norm_offset) * norm_scale, then gamma on the [0, 1] map u = (x + 1) / 2 of the
  normalised range, leaving values outside [0, 1] as they are (u**g is 0 and 1 at the
  ends, so the curve stays continuous and hot pixels keep their excess), then
  x <- x * gain + offset.

  Args:
    x: [slices, patch, patch, channels] float32 raw intensities, modified in place.
    norm_offset, norm_scale: [channels] the volume's normalisation.
    plan: the plan; row i holds the jitter of this sample.
    i: the row.
  """
  x -= norm_offset
  x *= norm_scale
  gamma = plan.gamma[i]
  if (gamma != 1).any():
    # u**g - u is 0 wherever u is clipped, so adding it leaves out-of-range values alone.
    u = np.clip(x, -1, 1)
    u += 1
    u *= 0.5
    # exp(g log u) is the same curve, and numpy's float32 exp and log are vectorised
    # where its power is not (about 1.4x faster here).
    with np.errstate(divide="ignore"):
      bend = np.log(u)
    bend *= gamma
    np.exp(bend, out=bend)
    bend -= u
    bend *= 2
    x += bend
  if (plan.gain[i] != 1).any():
    x *= plan.gain[i]
  if (plan.offset[i] != 0).any():
    x += plan.offset[i]


def class_weights(counts: Sequence[int] | np.ndarray) -> np.ndarray:
  """Inverse-square-root-frequency class weights, mean 1 over the classes present.

  1/sqrt(n) rather than 1/n: rare phases (e.g. pores in cement paste) gain weight without
  letting a few hundred pixels outweigh the bulk phases. Classes with no training pixels
  get weight 0; they cannot appear in a training batch, and 0 keeps them from bending the
  normalisation.

  Args:
    counts: [classes] training-pixel count per class, `SlabLoader.class_counts()`.

  Returns:
    [classes] float32 weights.

  Raises:
    ValueError: if counts is not 1-D, has a negative entry, or is all zero.
  """
  counts = np.asarray(counts, np.float64)
  if counts.ndim != 1 or (counts < 0).any():
    raise ValueError(f"class counts must be a 1-D array of non-negative counts, got {counts}")
  present = counts > 0
  if not present.any():
    raise ValueError("class counts are all zero: there are no labelled training pixels")
  weights = np.zeros_like(counts)
  weights[present] = 1.0 / np.sqrt(counts[present])
  weights[present] /= weights[present].mean()
  return weights.astype(np.float32)
