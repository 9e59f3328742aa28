"""How a segmentation runs (`SegmentSettings`) and what one run did (`SegmentationResult`).

settings = infer.SegmentSettings(tile=512, overlap=64, batch=8, tta=True)
result = infer.segment_from_checkpoint("runs/unet", "vol.zarr", output="seg.zarr",
                                       settings=settings)
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import jax

# Output chunks are [1, CHUNK_YX, CHUNK_YX] (smaller when the block is).
CHUNK_YX = 512
DEFAULT_BLOCK = 2048
# Compute dtypes a checkpoint can be run in (parameters stay float32).
COMPUTE_DTYPES = ("float32", "bfloat16")


@dataclasses.dataclass(frozen=True)
class SegmentSettings:
  """The tiling, the passes and the bookkeeping of a segmentation run.

  What the model is (channels, slab depth, classes, size multiple) comes with the model,
  and the output paths are arguments of `segment_volume`; the rest is here. Values are
  checked by `segment_volume`, before anything is compiled or written, with messages
  that name the flag.

  Attributes:
    tile: tile side in pixels, a multiple of the model's size multiple.
    overlap: minimum overlap of neighbouring tiles, and the halo read around blocks
      and reflected at the volume border; 0 <= overlap < tile.
    batch: tiles per device call (rounded up to a multiple of the device count).
    block: y-x side of a block; at most 512 or a multiple of 512 (the output chunk).
    window: blending window, "cosine" or "gaussian".
    tta: average over flips, quarter turns and slab reversal (`predict.augmented_mean`;
      8-16 forward passes a tile).
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

  tile: int = 512
  overlap: int = 64
  batch: int = 8
  block: int = DEFAULT_BLOCK
  window: str = "cosine"
  tta: bool = False
  only_slices: Sequence[int] | None = None
  dtype: str | None = None
  overwrite: bool = False
  progress: bool = True
  process_index: int | None = None
  process_count: int | None = None
  devices: Sequence[jax.Device] | None = None

  def __post_init__(self):
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
