"""How a segmentation runs (`SegmentSettings`) and what one run did (`SegmentationResult`).

settings = infer.SegmentSettings(tile=768, overlap=64, batch=2, tta="auto")
result = infer.segment_from_checkpoint("runs/unet", "vol.zarr", output="seg.zarr",
                                       settings=settings)
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import jax

from fibseg_jax.infer.tiling import InferenceError

# Output chunks are [1, CHUNK_YX, CHUNK_YX] (smaller when the block is).
CHUNK_YX = 512
# Defaults chosen by measurement on a paper-size slice (3868 x 4062, 2 channels, 2-core
# CPU; BUILD_NOTES.md "Segmentation throughput"): the forward pass runs at the same
# Mpixel/s for tiles of 256 to 1024 and batches of 1 to 8, so what counts is the pixels
# run through the model per pixel written (the overlap and the halo are recomputed):
# one 4096 block per paper slice with fitted 720-752 tiles runs 1.24x its pixels, the
# former 512 tiles in 2048 blocks 1.67x. Batch 2 of 768 tiles is about the pixels of the
# former 8 of 512 per device call, with less activation memory on CPU.
DEFAULT_TILE = 768
DEFAULT_OVERLAP = 64
DEFAULT_BATCH = 2
DEFAULT_BLOCK = 4096
# Compute dtypes a checkpoint can be run in (parameters stay float32).
COMPUTE_DTYPES = ("float32", "bfloat16")
# What --tta takes: a number of test-time passes (the first k of
# `predict.tta_transforms`), "off" (= 1), "all" (16 for a slab, 8 for one slice) or
# "auto" (`AUTO_PASSES` on the platform of the devices).
TTA_VALUES = ("off", "1", "2", "4", "8", "all", "auto")
ALL_PASSES = 16  # the most any tile has: 8 in-plane symmetries x the slab reversed
# "auto": every pass on an accelerator; on CPU 2 (the x flip): over the suite of stacks
# 2 passes scored no lower than 1 on any stack, +0.5 +- 0.3 points on average, for about
# 2x the time (docs/results.md, "Defaults decided on the suite").
AUTO_PASSES = {"cpu": 2}


def parse_tta(value: bool | int | str) -> int | str:
  """A --tta value as a pass count (1, 2, 4, 8 or 16 = all) or "auto".

  Args:
    value: True (all, as in run records before pass counts), False (off), a count, or
      one of `TTA_VALUES`.

  Raises:
    InferenceError: anything else (one line naming --tta and the expected values).
  """
  if isinstance(value, bool):
    return ALL_PASSES if value else 1
  text = str(value).strip().lower()
  if text == "auto":
    return "auto"
  if text == "off":
    return 1
  if text == "all" or text == str(ALL_PASSES):
    return ALL_PASSES
  if text in TTA_VALUES:
    return int(text)
  raise InferenceError(f"--tta={value}: expected one of {', '.join(TTA_VALUES)}")


def tta_passes(value: bool | int | str, platform: str) -> int:
  """The pass count of a --tta value on devices of `platform` ("cpu", "gpu", "tpu", ...)."""
  parsed = parse_tta(value)
  if parsed == "auto":
    return AUTO_PASSES.get(platform, ALL_PASSES)
  return parsed


@dataclasses.dataclass(frozen=True)
class SegmentSettings:
  """The tiling, the passes and the bookkeeping of a segmentation run.

  What the model is (channels, slab depth, classes, size multiple) comes with the model,
  and the output paths are arguments of `segment_volume`; the rest is here. Values are
  checked by `segment_volume`, before anything is compiled or written, with messages
  that name the flag.

  Attributes:
    tile: the largest tile side in pixels, a multiple of the model's size multiple; each
      region is covered by as many tiles as this side needs, each as small as covering
      it allows (`tiling.fitted_tile`).
    overlap: minimum overlap of neighbouring tiles, and the halo read around blocks
      and reflected at the volume border; 0 <= overlap < tile.
    batch: tiles per device call (rounded up to a multiple of the device count).
    block: y-x side of a block; at most 512 or a multiple of 512 (the output chunk).
    window: blending window, "cosine" or "gaussian".
    tta: test-time augmentation: the number of passes averaged over (the first k of
      `predict.tta_transforms`: identity, x flip, y flip, both flips, the transposed
      four, then each with the slab reversed), one of 1 (off), 2, 4, 8, 16 (all), a
      `TTA_VALUES` string, or "auto" (all on an accelerator, `AUTO_PASSES["cpu"]` on
      CPU). True means all and False off, as before pass counts existed.
    only_slices: segment only these slices (e.g. held-out slices, or a trial before the
      whole stack); the others stay unwritten (255, not segmented, in every array) and
      the output counts as complete without them. None: every slice.
    dtype: compute dtype of a checkpoint's model ("float32" or "bfloat16") instead of
      the one it was trained with, for `segment_from_checkpoint` (parameters stay
      float32; bfloat16 is for accelerators: on CPU it is no faster). None: as trained.
    overwrite: replace existing output arrays.
    progress: show a progress bar (stderr) with the pixel rate and the blocks done, and
      after the first block the estimated time of all of this process's blocks.
    process_index: this process's share of the blocks; default `jax.process_index()`.
    process_count: number of shares; default `jax.process_count()`.
    devices: devices to shard tiles over; default this process's devices.
  """

  tile: int = DEFAULT_TILE
  overlap: int = DEFAULT_OVERLAP
  batch: int = DEFAULT_BATCH
  block: int = DEFAULT_BLOCK
  window: str = "cosine"
  tta: bool | int | str = False
  only_slices: Sequence[int] | None = None
  dtype: str | None = None
  overwrite: bool = False
  progress: bool = True
  process_index: int | None = None
  process_count: int | None = None
  devices: Sequence[jax.Device] | None = None

  def __post_init__(self):
    object.__setattr__(self, "tta", parse_tta(self.tta))
    if self.only_slices is not None:
      object.__setattr__(self, "only_slices", tuple(int(z) for z in self.only_slices))
    if self.devices is not None:
      object.__setattr__(self, "devices", tuple(self.devices))


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
