"""Blending overlapping tiles into a region's class probabilities, and their encodings.

The probabilities of a region are the sum over its tiles of window * softmax, divided by
the summed window. What segmentation writes from them: labels (argmax), uint8
probabilities round(255 * p) and uint8 uncertainty round(255 * normalised entropy).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import numpy as np

from fibseg_jax.infer import predict, tiling


class RegionBlender:
  """Blends overlapping tiles of a region, reusing its buffers across regions of one size.

  Blocks of one footprint come one after another (z innermost), so the accumulator
  [y, x, classes] and the summed window [y, x] are allocated once per footprint instead
  of once per block.
  """

  def __init__(self, predictor: predict.TilePredictor, overlap: int, normalise: bool = True):
    """Args: normalise: divide by the summed window (the probabilities); False leaves
    the window-weighted sums, whose argmax is the same (the window sum is one positive
    number per pixel): what the labels alone need, one pass over the region less."""
    self._predictor = predictor
    self._overlap = overlap
    self._normalise = normalise
    self._key = None
    self._acc: np.ndarray | None = None
    self._weights: np.ndarray | None = None

  def __call__(self, slab: Sequence[np.ndarray], tile_yx: Sequence[int]) -> np.ndarray:
    """Blended probabilities [y, x, classes] float32 of a region; see `blend_region`.

    Unnormalised (the window-weighted sums) when the blender was made with
    normalise=False. The result is a buffer of this blender, overwritten by the next call.
    """
    shape_yx = tuple(slab[0].shape[:2])
    ty, tx = (int(t) for t in tile_yx)
    starts = tiling.tile_grid(shape_yx, (ty, tx), self._overlap)
    predictor = self._predictor
    if self._key != (shape_yx, ty, tx):
      self._key, self._acc, self._weights = (shape_yx, ty, tx), None, None
      if self._normalise:
        window = predictor.window((ty, tx))
        self._weights = tiling.weight_sum(shape_yx, (ty, tx), starts, window)[..., None]
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
    if self._weights is not None:
      self._acc /= self._weights
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


def to_uint8_probabilities(probs: np.ndarray) -> np.ndarray:
  return np.clip(np.rint(probs * 255.0), 0, 255).astype(np.uint8)


def normalised_entropy(probabilities: np.ndarray) -> np.ndarray:
  """Entropy of class probabilities divided by log(classes): 0 certain, 1 uniform.

  Args:
    probabilities: `[..., classes]`, float (non-negative) or integer (uint8 as
      `fibseg segment` writes them: round(255 p), read as p = value / 255). Each pixel's are
      divided by their sum first (uint8-rounded probabilities sum near, not at, 1).

  Returns:
    `[...]` float32 in [0, 1]; 0 everywhere for a one-class model.
  """
  p = np.asarray(probabilities)
  p = p.astype(np.float32) / 255.0 if np.issubdtype(p.dtype, np.integer) else p
  p = np.asarray(p, np.float32)
  classes = p.shape[-1]
  if classes < 2:
    return np.zeros(p.shape[:-1], np.float32)
  p = p / np.maximum(p.sum(axis=-1, keepdims=True), np.float32(1e-12))
  # 0 log 0 = 0: p * log(tiny) is exactly 0 where p is.
  h = -np.sum(p * np.log(np.maximum(p, np.float32(1e-12))), axis=-1)
  return np.clip(h / np.float32(math.log(classes)), 0.0, 1.0).astype(np.float32)


def to_uint8_uncertainty(probs: np.ndarray) -> np.ndarray:
  """round(255 * normalised entropy) of `probs` [..., classes]."""
  return np.rint(normalised_entropy(probs) * 255.0).astype(np.uint8)
