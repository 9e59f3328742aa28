"""Sliding-window segmentation of every slice of a volume, memory bounded.

The volume is cut into blocks (one slice x up to `block` x `block` pixels, aligned to
the output chunks). For each block a background thread reads the slab region (the
block plus a halo of `overlap` pixels, reflected at the volume border, over `slices`
slices reflected at the stack ends) while the devices compute the previous one. Tiles
of the region go to the devices in batches; their softmax probabilities, weighted by a
blending window, are summed and divided by the summed window, and the block's labels
(argmax), optional probabilities and optional uncertainty (their normalised entropy)
are written. The block is then marked done, so a rerun resumes where an interrupted one
stopped. Ctrl-C stops after the block in progress, its writes and marker complete.

What is held at any time: the slices of one region (at most 2 x `slices` of them, the
read-ahead included, most shared), one accumulator [region_y, region_x, classes]
float32, the writes of two blocks in flight, and one batch of tiles with the model's
activations (set by --batch and --tile). None of it depends on the number of slices,
so memory does not grow with the volume. With the default 2048-pixel blocks, slices of
the paper's size (3868 x 4062, 2 channels) peak at about 0.8 GB for the whole process
with a per-pixel model; a U-Net adds its activations for one batch.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import dataclasses
import math
import os
import queue
import signal
import sys
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import flax
import flax.linen as nn
import jax
import numpy as np
import tensorstore as ts
from tqdm import tqdm

from fibseg_jax import checkpoint as checkpoint_lib
from fibseg_jax import outputs
from fibseg_jax.data import volume as volume_lib
from fibseg_jax.infer import predict, store, tiling
from fibseg_jax.infer.tiling import Block, InferenceError, RegionGeometry

# Output chunks are [1, CHUNK_YX, CHUNK_YX] (smaller when the block is).
CHUNK_YX = 512
DEFAULT_BLOCK = 2048
# Compute dtypes a checkpoint can be run in (parameters stay float32).
COMPUTE_DTYPES = ("float32", "bfloat16")
# Blocks whose writes may be in flight while the next block computes.
_WRITES_IN_FLIGHT = 2


@dataclasses.dataclass(frozen=True)
class SegmentationResult:
  """What one call of `segment_volume` did.

  Attributes:
    output: the labels array path.
    probabilities: the probabilities array path, or None.
    blocks_total: blocks of the whole volume.
    blocks_assigned: blocks of this process.
    blocks_skipped: blocks of this process already finished by an earlier run.
    blocks_done: blocks segmented by this call.
    complete: every block of the volume is finished (all processes).
    seconds: wall time of the segmentation loop.
    mpixels: output pixels written by this call, in millions.
    segmented: keys (z.y0.x0) of the blocks segmented by this call, in order.
    uncertainty: the uncertainty array path, or None.
  """

  output: Any
  probabilities: Any
  blocks_total: int
  blocks_assigned: int
  blocks_skipped: int
  blocks_done: int
  complete: bool
  seconds: float
  mpixels: float
  segmented: tuple[str, ...] = ()
  uncertainty: Any = None

  @property
  def mpixels_per_second(self) -> float:
    return self.mpixels / self.seconds if self.seconds > 0 else float("nan")


class SlabReader:
  """Reads the slab region of each block in a background thread, one block ahead.

  Consecutive blocks of one region share slices, so slices of the current region are
  kept and only the missing ones are read; leaving a region drops them.

  Iterate to get (block, geometry, slab) with slab a list of `slices` arrays
  [region_y, region_x, channels] in the volume's dtype (shared, do not modify).
  """

  def __init__(
    self,
    volume: volume_lib.Volume,
    blocks: Sequence[Block],
    *,
    channel_indices: Sequence[int],
    slices: int,
    halo: int,
    tile: int,
    size_multiple: int,
    read_ahead: int = 1,
  ):
    self._volume = volume
    self._image = ts.open(
      {"driver": "zarr3", "kvstore": volume_lib.child_spec(volume.kvstore, "image")},
      open=True,
      context=store.STREAM_CONTEXT,
    ).result()
    self._blocks = list(blocks)
    self._channels = np.asarray(channel_indices)
    self._slices = slices
    self._halo = halo
    self._tile = tile
    self._multiple = size_multiple
    self._queue: queue.Queue = queue.Queue(maxsize=max(read_ahead, 1))
    self._stop = threading.Event()
    self._thread = threading.Thread(target=self._run, name="fibseg-slab-reader", daemon=True)

  def _read_slices(self, zs: Sequence[int], geom: RegionGeometry) -> dict[int, ts.Future]:
    y_lo, y_hi = int(geom.y_index.min()), int(geom.y_index.max()) + 1
    x_lo, x_hi = int(geom.x_index.min()), int(geom.x_index.max()) + 1
    return {z: self._image[z, y_lo:y_hi, x_lo:x_hi].read() for z in zs}

  def _region(self, data: np.ndarray, geom: RegionGeometry) -> np.ndarray:
    ys = geom.y_index - geom.y_index.min()
    xs = geom.x_index - geom.x_index.min()
    # Inside the volume nothing is reflected: use the read as is, without a copy.
    if not (_is_range(ys, data.shape[0]) and _is_range(xs, data.shape[1])):
      data = data[np.ix_(ys, xs)]
    if not _is_range(self._channels, data.shape[2]):
      data = data[..., self._channels]
    return data

  def _run(self) -> None:
    cache: dict[int, np.ndarray] = {}
    region = geom = None
    try:
      for block in self._blocks:
        if self._stop.is_set():
          return
        if block.region != region:
          # Blocks of one region share their footprint, hence their geometry.
          cache, region = {}, block.region
          geom = tiling.region_geometry(
            block,
            self._volume.shape[1:],
            halo=self._halo,
            tile=self._tile,
            size_multiple=self._multiple,
          )
        zs = [int(z) for z in tiling.slab_indices(block.z, self._slices, self._volume.shape[0])]
        futures = self._read_slices(sorted(set(zs) - set(cache)), geom)
        # Keep only what this block needs; the next block needs most of it again.
        cache = {z: a for z, a in cache.items() if z in zs}
        for z, f in futures.items():
          cache[z] = self._region(f.result(), geom)
        self._put((block, geom, [cache[z] for z in zs]))
    except BaseException as e:  # noqa: BLE001 - handed to the consumer, re-raised there
      self._put(e)
      return
    self._put(None)

  def _put(self, item: Any) -> None:
    while not self._stop.is_set():
      try:
        self._queue.put(item, timeout=0.1)
        return
      except queue.Full:
        continue

  def __iter__(self):
    self._thread.start()
    try:
      while True:
        item = self._queue.get()
        if item is None:
          return
        if isinstance(item, BaseException):
          raise item
        yield item
    finally:
      self.close()

  def close(self) -> None:
    self._stop.set()
    if self._thread.is_alive():
      self._thread.join(timeout=10)


def _is_range(index: np.ndarray, n: int) -> bool:
  return len(index) == n and np.array_equal(index, np.arange(n))


class RegionBlender:
  """Blends overlapping tiles of a region, reusing its buffers across regions of one size.

  Blocks of one footprint come one after another (z innermost), so the accumulator
  [y, x, classes] and the summed window [y, x] are allocated once per footprint instead
  of once per block.
  """

  def __init__(self, predictor: predict.TilePredictor, overlap: int):
    self._predictor = predictor
    self._overlap = overlap
    self._key = None
    self._acc: np.ndarray | None = None
    self._weights: np.ndarray | None = None

  def __call__(self, slab: Sequence[np.ndarray], tile_yx: Sequence[int]) -> np.ndarray:
    """Blended probabilities [y, x, classes] float32 of a region; see `blend_region`.

    The result is a buffer of this blender, overwritten by the next call.
    """
    shape_yx = tuple(slab[0].shape[:2])
    ty, tx = (int(t) for t in tile_yx)
    starts = tiling.tile_grid(shape_yx, (ty, tx), self._overlap)
    predictor = self._predictor
    if self._key != (shape_yx, ty, tx):
      self._key, self._acc = (shape_yx, ty, tx), None
      self._weights = tiling.weight_sum(shape_yx, (ty, tx), starts, predictor.window((ty, tx)))
    pending = None

    def accumulate(out: jax.Array, positions: Sequence[tuple[int, int]]) -> None:
      out = np.asarray(out)
      if self._acc is None or self._acc.shape[-1] != out.shape[-1]:
        self._acc = np.zeros((*shape_yx, out.shape[-1]), np.float32)
      for k, (y, x) in enumerate(positions):
        self._acc[y : y + ty, x : x + tx] += out[k]

    if self._acc is not None:
      self._acc.fill(0)
    for i in range(0, len(starts), predictor.batch):
      positions = starts[i : i + predictor.batch]
      # [n, slices, ty, tx, channels], cut from the slices without stacking the region.
      tiles = np.stack(
        [np.stack([s[y : y + ty, x : x + tx] for s in slab]) for y, x in positions], axis=0
      )
      out = predictor(tiles)  # asynchronous: the host blends the previous batch meanwhile
      if pending is not None:
        accumulate(*pending)
      pending = (out, positions)
    accumulate(*pending)
    self._acc /= self._weights[..., None]
    return self._acc


def blend_region(
  predictor: predict.TilePredictor,
  slab: Sequence[np.ndarray],
  tile_yx: Sequence[int],
  overlap: int,
) -> np.ndarray:
  """Blended class probabilities of a region from overlapping tiles.

  Args:
    predictor: runs the model on a batch of tiles.
    slab: `slices` arrays [y, x, channels] (raw volume values), y >= tile_y, x >= tile_x.
    tile_yx: tile size; multiples of the model's size multiple.
    overlap: minimum overlap of neighbouring tiles in pixels.

  Returns:
    [y, x, classes] float32: sum over tiles of window * softmax, divided by the sum of
    windows. The window is positive everywhere, so every pixel has weight.
  """
  return RegionBlender(predictor, overlap)(slab, tile_yx)


def _load_malloc_trim():
  try:
    return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
  except (OSError, AttributeError):  # not glibc
    return None


_MALLOC_TRIM = _load_malloc_trim()


def _release_free_memory() -> None:
  """Hands memory freed by the last block back to the OS (glibc only).

  Each block allocates and frees arrays of tens of MB; glibc keeps much of that in its
  heaps once its adaptive mmap threshold has grown, and resident memory then creeps up
  by hundreds of MB over a large stack although the working set does not change.
  """
  if _MALLOC_TRIM is not None:
    _MALLOC_TRIM(0)


def _to_uint8_probabilities(probs: np.ndarray) -> np.ndarray:
  return np.clip(np.rint(probs * 255.0), 0, 255).astype(np.uint8)


def normalised_entropy(probabilities: np.ndarray) -> np.ndarray:
  """Entropy of class probabilities divided by log(classes): 0 certain, 1 uniform.

  Args:
    probabilities: `[..., classes]` float, non-negative. Each pixel's are divided by
      their sum first (uint8-rounded probabilities sum near, not at, 1).

  Returns:
    `[...]` float32 in [0, 1]; 0 everywhere for a one-class model.
  """
  p = np.asarray(probabilities, np.float32)
  classes = p.shape[-1]
  if classes < 2:
    return np.zeros(p.shape[:-1], np.float32)
  p = p / np.maximum(p.sum(axis=-1, keepdims=True), np.float32(1e-12))
  # 0 log 0 = 0: p * log(tiny) is exactly 0 where p is.
  h = -np.sum(p * np.log(np.maximum(p, np.float32(1e-12))), axis=-1)
  return np.clip(h / np.float32(math.log(classes)), 0.0, 1.0).astype(np.float32)


def _to_uint8_uncertainty(probs: np.ndarray) -> np.ndarray:
  """round(255 * normalised entropy) of `probs` [..., classes]."""
  return np.rint(normalised_entropy(probs) * 255.0).astype(np.uint8)


class _StopRequest:
  """Ctrl-C (SIGINT) as a request to stop after the block in progress.

  The first Ctrl-C only sets `requested`: the block being computed is finished, its
  writes and done-marker (and those of the blocks before it) complete, then the loop
  stops. Another Ctrl-C while those writes complete is noted and changes nothing; while
  a block is computed it stops at once (KeyboardInterrupt) once the blocks before it are
  written: a rerun redoes the abandoned one. Takes over SIGINT only from the main thread
  and only where Python's default handler holds it.
  """

  def __init__(self):
    self.requested = False
    self._draining = False
    self._previous = None
    self._enabled = (
      threading.current_thread() is threading.main_thread()
      and signal.getsignal(signal.SIGINT) is signal.default_int_handler
    )

  def install(self) -> _StopRequest:
    if self._enabled:
      self._previous = signal.signal(signal.SIGINT, self._handle)
    return self

  def restore(self) -> None:
    """Gives SIGINT back to the handler it had."""
    if self._previous is not None:
      signal.signal(signal.SIGINT, self._previous)
      self._previous = None

  def _handle(self, signum, frame) -> None:
    del signum, frame
    if self._draining:
      self.requested = True
      tqdm.write("Ctrl-C: finishing the writes of the blocks done, then stopping", file=sys.stderr)
      return
    if self.requested:
      raise KeyboardInterrupt  # segment_volume words it, knowing the count
    self.requested = True
    tqdm.write(
      "Ctrl-C: stopping after the block in progress (Ctrl-C again: stop now)", file=sys.stderr
    )

  @contextlib.contextmanager
  def draining(self) -> Iterator[None]:
    """A context in which Ctrl-C cannot stop the writes of finished blocks."""
    self._draining = True
    try:
      yield
    finally:
      self._draining = False


def _duration(seconds: float) -> str:
  """A duration as a person reads it: "12.3 s", "4 min 10 s", "2 h 05 min"."""
  if seconds < 59.95:
    return f"{seconds:.1f} s"
  if seconds < 3599.5:
    whole = round(seconds)
    return f"{whole // 60} min {whole % 60} s"
  minutes = round(seconds / 60)
  return f"{minutes // 60} h {minutes % 60:02d} min"


def _estimate(seconds: float, first: Block, blocks: Sequence[Block]) -> str:
  """The time of all `blocks` from that of the `first`, in proportion to their pixels."""
  total = seconds * sum(b.pixels for b in blocks) / first.pixels
  return (
    f"first block took {_duration(seconds)} (compiling included); about {_duration(total)} "
    f"for all {len(blocks)} blocks"
  )


def _check_tile_against_training(
  tile: int,
  train_patch: int | None,
  shape_yx: Sequence[int],
  block: int,
  overlap: int,
  checkpoint: str | None,
) -> None:
  """Refuses a --tile below the training patch where --tile is what bounds the tiles."""
  if not train_patch or tile >= train_patch:
    return
  # A region (block and halo) smaller than --tile is one tile of its own size.
  widest = max(min(block, n) + 2 * overlap for n in shape_yx)
  if tile >= widest:
    return
  where = f" (data.patch of {checkpoint})" if checkpoint else ""
  raise InferenceError(
    f"--tile={tile} is below the training patch of {train_patch} pixels{where}: the model "
    "normalises each tile on its own (instance or group norm), so smaller tiles see other "
    f"statistics than in training; use --tile={train_patch} or more"
  )


def _barrier(name: str) -> None:
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # noqa: PLC0415 - multi-host runs only

    multihost_utils.sync_global_devices(name)


def _check_model(
  predictor: predict.TilePredictor,
  slices: int,
  channels: int,
  classes: Sequence[str],
  probe: int,
  checkpoint: str | None,
) -> None:
  """Checks, without running it, that the model maps a slab to logits of its classes."""
  try:
    out_shape = predictor.output_shape(slices, (probe, probe), channels)
  except (flax.errors.FlaxError, ValueError, TypeError) as e:
    where = f"checkpoint {checkpoint}" if checkpoint else "the given variables"
    raise InferenceError(
      f"the model cannot run on slabs [batch, {slices}, y, x, {channels}] with {where}: {e}"
    ) from e
  if out_shape[1:3] != (probe, probe):
    raise InferenceError(
      f"model maps tiles of {(probe, probe)} to {out_shape[1:3]}; segmentation needs logits "
      "[batch, y, x, classes] of the input's y and x"
    )
  if out_shape[-1] != len(classes):
    raise InferenceError(
      f"model predicts {out_shape[-1]} classes but {len(classes)} class names were given "
      f"({list(classes)})"
    )


def _open_outputs(
  output: Any,
  probabilities: Any,
  plan: store.OutputPlan,
  shape: Sequence[int],
  classes: Sequence[str],
  run: Mapping[str, Any],
  chunk_yx: int,
  process_index: int,
  uncertainty: Any = None,
) -> store.SegmentationOutput:
  """Process 0 creates (or replaces) the outputs; the others open them after it."""
  kwargs = dict(
    plan=plan, shape=shape, classes=classes, run=run, chunk_yx=chunk_yx, uncertainty=uncertainty
  )
  out = store.open_output(output, probabilities, **kwargs) if process_index == 0 else None
  _barrier("fibseg_jax.infer.output_created")
  if out is None:
    out = store.open_output(output, probabilities, may_delete=False, **kwargs)
  return out


def segment_volume(
  volume: volume_lib.Volume | Any,
  model: nn.Module,
  variables: Mapping[str, Any],
  *,
  channels: Sequence[str],
  slices: int,
  output: Any,
  probabilities: Any | None = None,
  classes: Sequence[str] | None = None,
  tile: int = 512,
  overlap: int = 64,
  batch: int = 8,
  block: int = DEFAULT_BLOCK,
  window: str = "cosine",
  size_multiple: int = 1,
  checkpoint: str | None = None,
  overwrite: bool = False,
  progress: bool = True,
  process_index: int | None = None,
  process_count: int | None = None,
  devices: Sequence[jax.Device] | None = None,
  tta: bool = False,
  only_slices: Sequence[int] | None = None,
  uncertainty: Any | None = None,
  train_patch: int | None = None,
) -> SegmentationResult:
  """Segments every slice of a volume into a zarr v3 label array.

  Args:
    volume: an opened `Volume` or its root (path, ``memory://name``, ...).
    model: flax module mapping a slab batch `[batch, slices, y, x, channels]` (float32,
      normalised) to logits `[batch, y, x, classes]` of the central slice.
    variables: the model's variables ({'params': ..., maybe 'batch_stats': ...}).
    channels: volume channel names the model takes, in its order, e.g. ("ICE", "TLD").
    slices: odd slab depth the model takes.
    output: path of the labels array [z, y, x] uint8 (the path is the array).
    probabilities: optional path of a [z, y, x, classes] uint8 array, round(255 * p).
    classes: class names, one per model output; default the volume's classes.
    tile: tile side in pixels, a multiple of `size_multiple`.
    overlap: minimum overlap of neighbouring tiles, and the halo read around blocks
      and reflected at the volume border; 0 <= overlap < tile.
    batch: tiles per device call (rounded up to a multiple of the device count).
    block: y-x side of a block; at most 512 or a multiple of 512 (the output chunk).
    window: blending window, "cosine" or "gaussian".
    size_multiple: the model's y and x must be multiples of this (2**depth).
    checkpoint: where the model came from, stored in the output attributes.
    overwrite: replace existing output arrays.
    progress: show a progress bar (stderr) with the pixel rate and the blocks done, and
      after the first block the estimated time of all of this process's blocks.
    process_index: this process's share of the blocks; default `jax.process_index()`.
    process_count: number of shares; default `jax.process_count()`.
    devices: devices to shard tiles over; default this process's devices.
    tta: average over flips, quarter turns and slab reversal (`predict.augmented_mean`;
      8-16 forward passes a tile).
    only_slices: segment only these slices (e.g. held-out slices, or a trial before the
      whole stack); the others stay unwritten (255, not segmented, in every array) and
      the output counts as complete without them.
    uncertainty: optional path of a [z, y, x] uint8 array, round(255 * entropy(p) /
      log(classes)) of the blended probabilities p: 0 = certain, 255 = uniform.
    train_patch: the y-x side of the training patches of a model that normalises each
      tile on its own (instance or group norm), or None (no such model, or unknown). A
      `tile` below it is refused rather than warned about: such tiles feed the norm
      other statistics than training did, and the labels change without any sign of
      it. Tiles that the volume or the block bound anyway are not refused.

  Returns:
    A `SegmentationResult`.

  Raises:
    InferenceError: a flag value the model or volume cannot take (missing channel,
      tile not a multiple of the size multiple or below `train_patch`, wrong number of
      classes, ...).
    KeyboardInterrupt: Ctrl-C, with a one-line message: the block in progress is
      finished, it and the blocks before it written and marked done ("stopped after N
      of M blocks; rerun the same command to resume"); a second Ctrl-C while a block
      is computed stops at once, leaving that block to the rerun.
    store.OutputError: the output exists and is complete, belongs to another run, or
      is something else.
    VolumeError: the volume cannot be opened.
  """
  if not isinstance(volume, volume_lib.Volume):
    volume = volume_lib.open_volume(volume, check_labels=False)
  process_index = jax.process_index() if process_index is None else int(process_index)
  process_count = jax.process_count() if process_count is None else int(process_count)
  channels = tuple(channels)
  classes = tuple(volume.classes if classes is None else classes)

  # Everything a user can get wrong is checked before anything is compiled or written.
  if slices < 1 or slices % 2 == 0:
    raise InferenceError(f"slices={slices} must be odd (the model's slab depth)")
  tiling.check_tiling(tile, overlap, size_multiple)
  _check_tile_against_training(tile, train_patch, volume.shape[1:], block, overlap, checkpoint)
  if block < 1 or (block > CHUNK_YX and block % CHUNK_YX):
    raise InferenceError(f"--block={block} must be at most {CHUNK_YX} or a multiple of it")
  if not classes:
    raise InferenceError("classes: the model's class names are unknown (empty)")
  channel_indices = volume.channel_indices(channels, flag="the model's channels")
  offset, scale = volume.normalization(channels)
  predictor = predict.TilePredictor(
    model,
    variables,
    offset=offset,
    scale=scale,
    overlap=overlap,
    window=window,
    batch=batch,
    devices=devices,
    tta=tta,
  )
  _check_model(predictor, slices, len(channels), classes, min(tile, size_multiple * 4), checkpoint)
  run = {
    "source": store.source_id(volume.root),
    "shape": list(volume.shape),
    "classes": list(classes),
    "channels": list(channels),
    "slices": int(slices),
    "checkpoint": checkpoint,
    "tile": int(tile),
    "overlap": int(overlap),
    "window": window,
    "block": int(block),
    "probabilities": probabilities is not None,
    "voxel_size_nm": list(volume.metadata.voxel_size_nm),
  }
  if uncertainty is not None:  # only when asked for, so earlier runs' outputs still resume
    run["uncertainty"] = True
  if tta:  # only when on, so outputs of runs before the option still resume
    run["tta"] = True
  blocks = tiling.plan_blocks(volume.shape, block)
  if only_slices is not None:
    chosen = sorted({int(z) for z in only_slices})
    outside = [z for z in chosen if not 0 <= z < volume.shape[0]]
    if not chosen or outside:
      raise InferenceError(
        f"--slices={','.join(map(str, chosen))}: expected slices within 0..{volume.shape[0] - 1}"
      )
    run["only_slices"] = chosen
    blocks = [b for b in blocks if b.z in set(chosen)]
  mine = tiling.assign_blocks(blocks, process_index, process_count)
  plan = store.plan_output(
    output,
    probabilities,
    run=run,
    all_keys=[b.key for b in blocks],
    source=volume.root,
    overwrite=overwrite,
    uncertainty=uncertainty,
  )
  # Every process decides from the store as it was; only then may process 0 change it
  # (else another process can find a half-created array and refuse it).
  _barrier("fibseg_jax.infer.output_planned")
  out = _open_outputs(
    output,
    probabilities,
    plan,
    volume.shape,
    classes,
    run,
    min(block, CHUNK_YX),
    process_index,
    uncertainty=uncertainty,
  )
  todo = [b for b in mine if b.key not in out.done]
  skipped = len(mine) - len(todo)

  start = time.perf_counter()
  # Pixels with SI prefixes (874px/s, 87.4kpx/s, 2.10Mpx/s): readable however slow the
  # model; the blocks done are the postfix.
  bar = tqdm(
    total=sum(b.pixels for b in todo),
    unit="px",
    unit_scale=True,
    disable=not progress,
    desc=f"segment {volume_lib.describe(output)}",
    bar_format="{l_bar}{bar}| {n_fmt}/{total_fmt}px [{elapsed}<{remaining}, {rate_noinv_fmt}"
    "{postfix}]",
    postfix=f"0/{len(todo)} blocks",
  )
  in_flight: list[tuple[Block, list[ts.Future]]] = []
  finished = 0  # blocks of this call with their done-marker

  def finish(keep: int) -> None:
    nonlocal finished
    while len(in_flight) > keep:
      done_block, futures = in_flight.pop(0)
      for f in futures:
        f.result()
      out.mark_done(done_block.key).result()
      finished += 1
      bar.set_postfix_str(f"{finished}/{len(todo)} blocks", refresh=False)
      bar.update(done_block.pixels)

  reader = SlabReader(
    volume,
    todo,
    channel_indices=channel_indices,
    slices=slices,
    halo=overlap,
    tile=tile,
    size_multiple=size_multiple,
  )
  blend = RegionBlender(predictor, overlap)
  stop = _StopRequest().install()
  estimated = False
  try:
    for blk, geom, slab in reader:
      if stop.requested:
        break
      probs = blend(slab, geom.tile_yx)
      cy, cx = geom.crop
      probs = probs[cy : cy + blk.y1 - blk.y0, cx : cx + blk.x1 - blk.x0]
      labels = np.argmax(probs, axis=-1).astype(np.uint8)
      futures = [out.labels[blk.z, blk.y0 : blk.y1, blk.x0 : blk.x1].write(labels)]
      if out.probabilities is not None:
        futures.append(
          out.probabilities[blk.z, blk.y0 : blk.y1, blk.x0 : blk.x1].write(
            _to_uint8_probabilities(probs)
          )
        )
      if out.uncertainty is not None:
        futures.append(
          out.uncertainty[blk.z, blk.y0 : blk.y1, blk.x0 : blk.x1].write(
            _to_uint8_uncertainty(probs)
          )
        )
      in_flight.append((blk, futures))
      if progress and not estimated and len(todo) > 1:
        estimated = True
        tqdm.write(_estimate(time.perf_counter() - start, blk, todo), file=sys.stderr)
      if stop.requested:
        break
      finish(keep=_WRITES_IN_FLIGHT)
      _release_free_memory()
    with stop.draining():
      finish(keep=0)
  except KeyboardInterrupt:
    with stop.draining():
      finish(keep=0)  # the blocks computed before it keep their work
    raise KeyboardInterrupt(
      f"stopped after {skipped + finished} of {len(mine)} blocks (the block in progress "
      "abandoned); rerun the same command to resume"
    ) from None
  except Exception as e:
    if not outputs.is_disk_full(e):
      raise
    for _, futures in in_flight:  # nothing may still be writing when we return
      for f in futures:
        try:
          f.result()
        except Exception:  # noqa: BLE001 - already failing; these blocks are redone
          pass
    paths = [p for p in (output, probabilities, uncertainty) if p is not None]
    per_pixel = 2 + (len(classes) if probabilities is not None else 0)  # labels + uncertainty
    remaining = sum(b.pixels for b in todo[finished:])
    done_pixels = sum(b.pixels for b in mine) - remaining
    raise _disk_full(paths, skipped + finished, done_pixels, remaining, per_pixel) from e
  finally:
    stop.restore()
    reader.close()
    bar.close()
  if stop.requested and finished < len(todo):
    raise KeyboardInterrupt(
      f"stopped after {skipped + finished} of {len(mine)} blocks; rerun the same command to resume"
    )
  seconds = time.perf_counter() - start
  complete = {b.key for b in blocks} <= out.finished_keys()
  return SegmentationResult(
    output=output,
    probabilities=probabilities,
    blocks_total=len(blocks),
    blocks_assigned=len(mine),
    blocks_skipped=skipped,
    blocks_done=len(todo),
    complete=complete,
    seconds=seconds,
    mpixels=sum(b.pixels for b in todo) / 1e6,
    segmented=tuple(b.key for b in todo),
    uncertainty=uncertainty,
  )


def _disk_full(
  paths: Sequence[Any], done: int, done_pixels: int, remaining_pixels: int, per_pixel: int
):
  """The one-line error for a full disk. Finished blocks are kept (a rerun resumes them);
  the space still needed is extrapolated from what they took, or bounded by the raw size."""
  local = [volume_lib.local_path(p) for p in paths]
  written = sum(outputs.dir_size(p) for p in local if p is not None and os.path.exists(p))
  rate = written / done_pixels if done_pixels and written else per_pixel
  err = outputs.disk_full_error(
    "--output",
    volume_lib.describe(paths[0]),
    rate * remaining_pixels,
    "rest of the run",
    kept=f"The {done} finished blocks are kept (a rerun resumes after them); free some space",
  )
  return store.OutputError(str(err))


def segment_from_checkpoint(
  checkpoint: str | Sequence[str],
  volume: volume_lib.Volume | Any,
  *,
  output: Any,
  dtype: str | None = None,
  **kwargs: Any,
) -> SegmentationResult:
  """`segment_volume` with the model, channels, slab depth and classes of a checkpoint.

  Args:
    checkpoint: a training workdir, its checkpoints/ directory or one step directory
      (the best checkpoint by validation mIoU of a workdir is used); or several, whose
      class probabilities are averaged (a checkpoint or seed ensemble: they must take the
      same channels and slab depth and predict the same classes).
    volume: an opened `Volume` or its root.
    output: path of the labels array.
    dtype: compute dtype ("float32" or "bfloat16") instead of the one the model was
      trained with; parameters stay float32 (bfloat16 is for accelerators: on CPU it is
      no faster).
    **kwargs: the other keyword arguments of `segment_volume` (probabilities,
      uncertainty, tile, overlap, batch, block, window, overwrite, progress, tta, ...).

  Raises:
    checkpoint.CheckpointError: not a checkpoint.
    InferenceError: the volume lacks a channel the model needs, the checkpoint records
      no class names, or ensemble members disagree on channels, slices or classes.
    See `segment_volume` for the rest.
  """
  paths = [checkpoint] if isinstance(checkpoint, str | os.PathLike) else list(checkpoint)
  if not paths:
    raise InferenceError("--workdir: give at least one training workdir or checkpoint")
  if dtype is not None and dtype not in COMPUTE_DTYPES:
    raise InferenceError(f"--dtype={dtype}: expected one of {', '.join(COMPUTE_DTYPES)}")
  members = [checkpoint_lib.load(os.fspath(p)) for p in paths]
  restored = members[0]
  for other in members[1:]:
    for what in ("channels", "slices", "classes"):
      if getattr(other, what) != getattr(restored, what):
        raise InferenceError(
          f"ensemble members disagree on {what}: {restored.path} has "
          f"{getattr(restored, what)}, {other.path} has {getattr(other, what)}"
        )
  if not isinstance(volume, volume_lib.Volume):
    volume = volume_lib.open_volume(volume, check_labels=False)
  missing = [c for c in restored.channels if c not in volume.channels]
  if missing:
    raise InferenceError(
      f"--input={volume_lib.describe(volume.root)} lacks channel(s) {missing} that the model "
      f"of {restored.path} needs (it takes {list(restored.channels)}; the volume has "
      f"{list(volume.channels)})"
    )
  if not restored.classes:
    raise InferenceError(f"checkpoint {restored.path} records no class names (data.classes)")

  def in_dtype(model: nn.Module) -> nn.Module:
    if dtype is None or dtype == model.config.dtype:
      return model
    return model.clone(config=dataclasses.replace(model.config, dtype=dtype))

  # Batch norm at inference uses its running statistics: any tile size sees the same.
  patches = [
    int(m.config.data.patch)
    for m in members
    if m.model.config.norm in ("instance", "group") and m.config.data.get("patch")
  ]
  train_patch = max(patches, default=None)
  if len(members) == 1:
    model, variables = in_dtype(restored.model), restored.variables
  else:
    model = predict.Ensemble([in_dtype(m.model) for m in members])
    variables = tuple(m.variables for m in members)
  return segment_volume(
    volume,
    model,
    variables,
    channels=restored.channels,
    slices=restored.slices,
    classes=restored.classes,
    size_multiple=math.lcm(*(m.size_multiple for m in members)),
    checkpoint=",".join(m.path for m in members),
    output=output,
    train_patch=train_patch,
    **kwargs,
  )
