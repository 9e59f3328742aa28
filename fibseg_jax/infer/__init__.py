"""Whole-volume segmentation: overlapping tiles, blended, written block by block.

  result = infer.segment_volume(
      "vol.zarr", model, variables, channels=("ICE", "TLD"), slices=3, size_multiple=16,
      output="seg.zarr", probabilities="probs.zarr", uncertainty="unc.zarr",
      settings=infer.SegmentSettings(tile=768, overlap=64, batch=2))

`segment_from_checkpoint` does the same from a training workdir or checkpoint. The
output is a zarr v3 array [z, y, x] uint8 whose attributes name the classes (with
optional class probabilities and per-voxel uncertainty arrays next to it); a rerun
after an interruption resumes, and each process of a multi-process run takes its own
blocks.
"""

from fibseg_jax.infer.blend import blend_region, normalised_entropy
from fibseg_jax.infer.predict import TilePredictor
from fibseg_jax.infer.reader import SlabReader
from fibseg_jax.infer.segment import segment_from_checkpoint, segment_volume
from fibseg_jax.infer.settings import SegmentationResult, SegmentSettings
from fibseg_jax.infer.slice import predict_slice
from fibseg_jax.infer.store import OutputError, open_array, read_attributes
from fibseg_jax.infer.tiling import (
  Block,
  InferenceError,
  assign_blocks,
  blend_window,
  plan_blocks,
  reflect_indices,
  region_geometry,
  slab_indices,
  tile_grid,
  tile_starts,
)

__all__ = [
  "Block",
  "InferenceError",
  "OutputError",
  "SegmentSettings",
  "SegmentationResult",
  "SlabReader",
  "TilePredictor",
  "assign_blocks",
  "blend_region",
  "blend_window",
  "normalised_entropy",
  "open_array",
  "plan_blocks",
  "predict_slice",
  "read_attributes",
  "reflect_indices",
  "region_geometry",
  "segment_from_checkpoint",
  "segment_volume",
  "slab_indices",
  "tile_grid",
  "tile_starts",
]
