"""Geometry of whole-volume segmentation: blocks, tiles, blending windows, reflection.

Everything here is plain numpy over integer coordinates, so tests can check coverage
without running a model.

Terms:
  block   the unit of work and of output: one slice x (up to) `block` x `block` pixels,
          aligned to the output chunk grid. A block is finished (and marked done) or not.
  halo    pixels read around a block on every side (reflected at the volume border), so
          pixels at a block edge get the same context as pixels inside it.
  region  a block plus its halo (and, for small images, reflect padding up to a size
          the model accepts). Tiles are laid over a region.
  tile    one model input: `tile` x `tile` pixels of a region (smaller only when the
          whole region is), neighbours overlapping by at least `overlap` pixels.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

# Training and inference must reflect slabs identically: one definition, in data.
from fibseg_jax.data.reader import slab_indices  # noqa: F401 - part of infer's API

WINDOWS = ("cosine", "gaussian")
# sigma of the Gaussian window as a fraction of the tile side (as in MONAI's
# sliding_window_inference), which leaves exp(-8) ~ 3e-4 at the tile edge.
GAUSSIAN_SIGMA = 0.125


class InferenceError(ValueError):
  """A user mistake in the inputs of a segmentation run; the message names the flag."""


def round_up(n: int, multiple: int) -> int:
  """The smallest multiple of `multiple` that is >= n."""
  return -(-n // multiple) * multiple


def reflect_indices(start: int, stop: int, size: int) -> np.ndarray:
  """Indices start..stop-1 folded into [0, size) by mirror reflection.

  The same as `np.pad(..., mode="reflect")`: -1 -> 1, size -> size - 2, repeating for
  ranges longer than the axis; an axis of size 1 repeats its one element.

  Returns:
    int64 indices, shape [stop - start].
  """
  idx = np.arange(start, stop, dtype=np.int64)
  if size == 1:
    return np.zeros_like(idx)
  period = 2 * (size - 1)
  idx = np.mod(idx, period)
  return np.where(idx >= size, period - idx, idx)


def tile_starts(size: int, tile: int, overlap: int) -> list[int]:
  """Start offsets of tiles of length `tile` that cover [0, size).

  Tiles step by `tile - overlap`; the last one is moved back to end exactly at `size`
  (so it may overlap its neighbour by more than `overlap`).

  Args:
    size: length of the axis; must be >= tile unless a single tile covers it.
    tile: tile length.
    overlap: minimum overlap of neighbouring tiles, 0 <= overlap < tile.

  Returns:
    Ascending start offsets; [0] when size <= tile.
  """
  if not 0 <= overlap < tile:
    raise InferenceError(f"overlap={overlap} must be in [0, tile={tile})")
  if size <= tile:
    return [0]
  stride = tile - overlap
  return list(range(0, size - tile, stride)) + [size - tile]


def tile_grid(
  shape_yx: Sequence[int], tile_yx: Sequence[int], overlap: int
) -> list[tuple[int, int]]:
  """(y, x) start offsets of the tiles covering a region, row-major."""
  ys = tile_starts(shape_yx[0], tile_yx[0], min(overlap, tile_yx[0] - 1))
  xs = tile_starts(shape_yx[1], tile_yx[1], min(overlap, tile_yx[1] - 1))
  return [(y, x) for y in ys for x in xs]


def window_1d(length: int, overlap: int, kind: str = "cosine") -> np.ndarray:
  """Blending weights along one tile axis, shape [length], max 1, never 0.

  "cosine": 1 in the middle, a raised-cosine ramp over the `overlap` pixels at each end.
  Two neighbours overlapping by exactly `overlap` sum to 1 there. The ramp is sampled at
  pixel centres, so its first value is sin^2(pi / (4 * overlap)) > 0, not 0: a pixel
  covered only by a tile edge (at a border of the volume) still has weight.
  "gaussian": exp(-d^2 / 2 sigma^2) around the centre, sigma = 0.125 * length.

  Raises:
    InferenceError: unknown kind.
  """
  if kind == "cosine":
    w = np.ones(length, np.float64)
    n = min(overlap, length)
    if n > 0:
      ramp = 0.5 * (1.0 - np.cos(np.pi * (np.arange(n) + 0.5) / overlap))
      w[:n] = np.minimum(w[:n], ramp)
      w[length - n :] = np.minimum(w[length - n :], ramp[::-1])
  elif kind == "gaussian":
    sigma = GAUSSIAN_SIGMA * length
    d = np.arange(length) - (length - 1) / 2.0
    w = np.exp(-0.5 * (d / sigma) ** 2)
    w /= w.max()  # even lengths have no pixel at the centre
  else:
    raise InferenceError(f"--window={kind!r} is not one of {WINDOWS}")
  return np.maximum(w, 1e-6).astype(np.float32)


def blend_window(tile_yx: Sequence[int], overlap: int, kind: str = "cosine") -> np.ndarray:
  """Separable 2D blending window [tile_y, tile_x] float32; see `window_1d`."""
  wy = window_1d(tile_yx[0], overlap, kind)
  wx = window_1d(tile_yx[1], overlap, kind)
  return np.outer(wy, wx)


def weight_sum(
  shape_yx: Sequence[int],
  tile_yx: Sequence[int],
  starts: Sequence[tuple[int, int]],
  window: np.ndarray,
) -> np.ndarray:
  """Sum of the tile windows over a region [y, x] float32 (the blending denominator)."""
  total = np.zeros(tuple(shape_yx), np.float32)
  ty, tx = tile_yx
  for y, x in starts:
    total[y : y + ty, x : x + tx] += window
  return total


def check_tiling(tile: int, overlap: int, size_multiple: int) -> None:
  """Checks --tile and --overlap against the model before anything is read or compiled.

  Raises:
    InferenceError: naming the flag and the valid values nearest to it.
  """
  if size_multiple < 1:
    raise InferenceError(f"size multiple {size_multiple} must be >= 1")
  if tile < size_multiple or tile % size_multiple:
    below = tile // size_multiple * size_multiple
    near = [v for v in (below, below + size_multiple) if v > 0]
    raise InferenceError(
      f"--tile={tile} is not a multiple of {size_multiple}, the model's size multiple "
      f"(2**depth); use {' or '.join(str(v) for v in near)}"
    )
  if not 0 <= overlap < tile:
    raise InferenceError(
      f"--overlap={overlap} must be in [0, --tile={tile}): pass a smaller --overlap "
      f"(e.g. --overlap={tile // 4}; the default is 64) or a larger --tile"
    )


@dataclasses.dataclass(frozen=True)
class Block:
  """One slice x y-x rectangle of the output: [z, y0:y1, x0:x1]."""

  z: int
  y0: int
  y1: int
  x0: int
  x1: int

  @property
  def key(self) -> str:
    """Name of the block's completion marker."""
    return f"{self.z}.{self.y0}.{self.x0}"

  @property
  def region(self) -> tuple[int, int]:
    """(y0, x0): blocks with the same region share their y-x footprint."""
    return (self.y0, self.x0)

  @property
  def pixels(self) -> int:
    return (self.y1 - self.y0) * (self.x1 - self.x0)


def plan_blocks(shape: Sequence[int], block: int) -> list[Block]:
  """All blocks of a [z, y, x] volume, y-x footprint major and z minor.

  Walking z innermost lets consecutive blocks share most slab slices (see `SlabReader`).

  Args:
    shape: (z, y, x) of the volume.
    block: y-x side of a block; the last row/column of blocks is cut at the border.
  """
  depth, height, width = (int(s) for s in shape)
  blocks = []
  for y0 in range(0, height, block):
    for x0 in range(0, width, block):
      for z in range(depth):
        blocks.append(Block(z, y0, min(y0 + block, height), x0, min(x0 + block, width)))
  return blocks


def assign_blocks(blocks: Sequence[Block], process_index: int, process_count: int) -> list[Block]:
  """The blocks one process segments: a contiguous share of the plan.

  Contiguous (rather than round-robin) shares keep runs of neighbouring slices on one
  process, so each slice is read about once instead of `slices` times.

  Raises:
    InferenceError: process_index outside [0, process_count).
  """
  if process_count < 1 or not 0 <= process_index < process_count:
    raise InferenceError(
      f"process_index={process_index} must be in [0, process_count={process_count})"
    )
  bounds = np.linspace(0, len(blocks), process_count + 1).round().astype(int)
  return list(blocks[bounds[process_index] : bounds[process_index + 1]])


@dataclasses.dataclass(frozen=True)
class RegionGeometry:
  """Where a block's region comes from and how tiles cover it.

  Attributes:
    y_index: [region_y] source row of every region row (reflected at the border).
    x_index: [region_x] source column of every region column.
    tile_yx: tile size used over this region (smaller than --tile only for small images).
    crop: (y, x) offset of the block inside the region (the halo).
  """

  y_index: np.ndarray
  x_index: np.ndarray
  tile_yx: tuple[int, int]
  crop: tuple[int, int]

  @property
  def shape(self) -> tuple[int, int]:
    return (len(self.y_index), len(self.x_index))


def fitted_tile(length: int, tile: int, overlap: int, size_multiple: int, min_tile: int = 0) -> int:
  """The tile side that covers `length` with the fewest tiles and the least overlap.

  As many tiles as `tile` needs (overlapping by at least `overlap`), each only as large
  as they need to be to cover `length` together: a multiple of `size_multiple`, at most
  `tile`, at least `min_tile` (the training patch of a model with per-tile norms). A
  2176-pixel region takes 5 tiles of 496 instead of 5 of 512; the overlap is recomputed
  work, so this is pixels not run through the model.

  Returns:
    The side; `min(tile, length rounded up to size_multiple)` when one tile covers it.
  """
  if length <= tile:
    return min(tile, round_up(length, size_multiple))
  if tile <= overlap:
    return tile
  n = -(-(length - overlap) // (tile - overlap))
  fit = round_up(-(-(length + (n - 1) * overlap) // n), size_multiple)
  return min(tile, max(fit, min(min_tile, tile)))


def region_geometry(
  block: Block,
  shape_yx: Sequence[int],
  *,
  halo: int,
  tile: int,
  size_multiple: int,
  min_tile: int = 0,
) -> RegionGeometry:
  """The region of a block: the block plus `halo` each side, reflected at the border.

  A region smaller than `tile` is padded at its end (by reflection) to the next
  multiple of `size_multiple`, and is covered by one tile of that size. A larger one is
  covered by tiles of `fitted_tile` (at most `tile`, at least `min_tile`).
  """
  sizes = []
  for lo, hi in ((block.y0, block.y1), (block.x0, block.x1)):
    length = hi - lo + 2 * halo
    t = fitted_tile(length, tile, halo, size_multiple, min_tile)
    sizes.append((length, t, max(t - length, 0)))
  (ly, ty, py), (lx, tx, px) = sizes
  y_index = reflect_indices(block.y0 - halo, block.y0 - halo + ly + py, shape_yx[0])
  x_index = reflect_indices(block.x0 - halo, block.x0 - halo + lx + px, shape_yx[1])
  return RegionGeometry(y_index, x_index, (ty, tx), (halo, halo))


def check_tile_against_training(
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
