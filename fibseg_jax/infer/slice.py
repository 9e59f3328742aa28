"""One slice through a trained model, in memory, prepared as `fibseg segment` prepares it.

  from fibseg_jax import checkpoint, infer
  from fibseg_jax.data import volume

  restored = checkpoint.load("runs/unet")
  labels, probabilities = infer.predict_slice(restored, volume.open_volume("vol.zarr"), 9)

For research code that wants one slice's answer without writing an output array; the
whole stack goes through `segment_from_checkpoint`, block by block.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import numpy as np

from fibseg_jax.data import volume as volume_lib
from fibseg_jax.infer import blend, predict, reader, tiling
from fibseg_jax.infer import settings as settings_lib
from fibseg_jax.infer.tiling import InferenceError


def predict_slice(
  restored: Any,
  volume: volume_lib.Volume | Any,
  z: int,
  *,
  tile: int = settings_lib.DEFAULT_TILE,
  overlap: int = settings_lib.DEFAULT_OVERLAP,
  batch: int = settings_lib.DEFAULT_BATCH,
  window: str = "cosine",
  tta: bool | int | str = False,
  devices: Sequence[jax.Device] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
  """Class labels and probabilities of slice `z`, as `segment_volume` computes them.

  The slab of `restored.slices` slices around z (reflected at the ends of the stack) is
  read in the channels the model takes; each channel is normalised with the volume's
  stored intensity range (`Volume.normalization`, as in training); the slice is
  reflected at its border and padded to the model's size multiple (2**depth), so any y
  and x work; overlapping tiles are blended. Nothing is written. Memory: the slab and
  [y, x, classes] float32 of one slice.

  Args:
    restored: a trained model, `checkpoint.load(workdir)`.
    volume: an opened `Volume` or its root.
    z: the slice, 0 <= z < depth.
    tile: tile side in pixels, a multiple of `restored.size_multiple`; at least the
      training patch (instance norm normalises each tile on its own).
    overlap: overlap of neighbouring tiles in pixels.
    batch: tiles per device call.
    window: blending window, "cosine" or "gaussian".
    tta: test-time passes averaged over (`SegmentSettings.tta`: 1 = off, 2, 4, 8, 16 =
      all, True = all, "auto"); each pass is one more forward pass a tile.
    devices: devices to shard tiles over; default this process's devices.

  Returns:
    (labels [y, x] uint8, the class index per pixel with names `restored.classes`;
    probabilities [y, x, classes] float32, summing to 1 per pixel).

  Raises:
    InferenceError: z outside the stack, or tile / overlap the model cannot take.
    VolumeError: the volume lacks a channel the model takes.
  """
  if not isinstance(volume, volume_lib.Volume):
    volume = volume_lib.open_volume(volume, check_labels=False)
  depth, height, width = volume.shape
  if not 0 <= int(z) < depth:
    raise InferenceError(f"z={z}: expected a slice within 0..{depth - 1}")
  multiple = restored.size_multiple
  tiling.check_tiling(tile, overlap, multiple)
  channel_indices = volume.channel_indices(restored.channels, flag="the model's channels")
  offset, scale = volume.normalization(restored.channels)
  predictor = predict.TilePredictor(
    restored.model,
    restored.variables,
    offset=offset,
    scale=scale,
    overlap=overlap,
    window=window,
    batch=batch,
    devices=devices,
    tta=tta,
  )
  whole_slice = tiling.Block(int(z), 0, height, 0, width)
  slabs = reader.SlabReader(
    volume,
    [whole_slice],
    channel_indices=channel_indices,
    slices=restored.slices,
    halo=overlap,
    tile=tile,
    size_multiple=multiple,
  )
  for _, geom, slab in slabs:
    probabilities = blend.blend_region(predictor, slab, geom.tile_yx, overlap)
    cy, cx = geom.crop
  probabilities = np.ascontiguousarray(probabilities[cy : cy + height, cx : cx + width])
  return np.argmax(probabilities, axis=-1).astype(np.uint8), probabilities
