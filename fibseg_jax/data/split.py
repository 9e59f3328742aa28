"""The validation split of the annotated slices: blocks, sampling cells, class counts.

The annotated area of every training slice is cut into square `val_block` x `val_block`
blocks, and whole blocks are drawn, over all slices jointly and deterministically from
`split_seed`, until they hold as close as possible to `val_fraction` of the annotated
pixels, never taking a block that holds the last training pixels of a class (strokes may
put a whole class in one block). Those blocks are the validation region. Each block is
further cut into sampling cells no larger than `patch` on a side, so that a training
patch can always contain a whole cell (`plans.train_plan` draws cells by their number of
training pixels).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Sequence

import numpy as np

from fibseg_jax.data import volume as volume_lib

IGNORE_LABEL = volume_lib.IGNORE_LABEL

# Region codes of `Split.masks`.
REGION_UNLABELLED = 0
REGION_TRAIN = 1
REGION_VALIDATION = 2
REGION_EVALUATION = 3

# Separate random streams, so the split never shifts when batch drawing changes.
SPLIT_STREAM = 0


class LoaderError(ValueError):
  """A loader setting does not fit the volume or the run."""


def axis_cuts(size: int, block: int, patch: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
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


class Split:
  """The validation blocks and training cells of the annotated slices of a volume.

  Construction reads the labels of `train_slices` once, one slice at a time.

  Attributes:
    train_slices: the annotated slices split (evaluation slices left out).
    train_area, val_area: labelled training and validation pixels.
    block_y, block_x: block boundaries along y and x.
    cell_y, cell_x: sampling-cell boundaries along y and x.
    cells: flat indices into [slices, cells_y, cells_x] of the cells holding training
      pixels; cell_cumsum their cumulative training-pixel counts; cells_shape the shape;
      cell_class_counts [cells, classes] their training pixels of each class.
  """

  def __init__(
    self,
    volume: volume_lib.Volume,
    train_slices: Sequence[int],
    *,
    val_block: int,
    patch: int,
    val_fraction: float,
    split_seed: int,
    flag: Callable[[str], str] = str,
  ):
    """Counts labels per cell and draws the validation blocks.

    Args:
      volume: the opened volume.
      train_slices: annotated slices to split, sorted.
      val_block: side of a validation block in pixels.
      patch: training patch side; cells are no larger.
      val_fraction: share of the annotated pixels to hold out, in [0, 1).
      split_seed: seed of the draw.
      flag: how a setting (e.g. "val_block") is named in an error; the field itself by
        default.

    Raises:
      LoaderError: no labels at all, or blocks too coarse to hold out the fraction.
    """
    self.volume = volume
    self.train_slices = tuple(train_slices)
    _, height, width = volume.shape
    self.block_y, self.cell_y, self._cell_block_y = axis_cuts(height, val_block, patch)
    self.block_x, self.cell_x, self._cell_block_x = axis_cuts(width, val_block, patch)
    cell_counts = np.stack([self._count_cells(z) for z in self.train_slices])
    block_counts = self._blocks_of_cells(cell_counts)  # [slices, by, bx, classes]
    areas = block_counts.sum(-1)
    total = int(areas.sum())
    where = volume_lib.describe(volume.root)
    if total == 0:
      raise LoaderError(
        f"volume {where}: annotated slices {list(self.train_slices)} hold no labels "
        f"(every pixel is {IGNORE_LABEL})"
      )
    val = np.zeros(areas.shape, bool)
    if val_fraction > 0:
      target = val_fraction * total
      rng = np.random.default_rng([split_seed, SPLIT_STREAM])
      taken = 0
      per_block = block_counts.reshape(-1, block_counts.shape[-1])
      train_left = per_block.sum(0)  # [classes] pixels each class keeps for training
      for i in rng.permutation(np.flatnonzero(areas > 0)):
        a = areas.flat[i]
        # Never hold out a class's last training pixels: with strokes, one block may hold
        # all of a class. Dense labels have every class in many blocks: split as before.
        last = np.any((per_block[i] > 0) & (per_block[i] >= train_left))
        if abs(taken + a - target) < abs(taken - target) and not last:
          val.flat[i] = True
          taken += a
          train_left = train_left - per_block[i]
      if taken == 0 or taken == total:
        raise LoaderError(
          f"{flag('val_block')}={val_block} is too coarse to hold out "
          f"{flag('val_fraction')}={val_fraction} of the {total} annotated pixels "
          f"of volume {where}: they lie in {int((areas > 0).sum())} of {areas.size} "
          f"blocks of {val_block} x {val_block} px, and no set of whole blocks holds "
          f"about {val_fraction:.0%} of them without all of a class; lower "
          f"{flag('val_block')}, annotate more places, or set {flag('val_fraction')}=0"
        )
    self.val_blocks = val  # [slices, blocks_y, blocks_x]
    self._class_counts = block_counts[~val].sum(0).astype(np.int64)
    self.val_area = int(areas[val].sum())
    self.train_area = total - self.val_area
    in_val = val[:, self._cell_block_y][:, :, self._cell_block_x]
    cell_area = np.where(in_val, 0, cell_counts.sum(-1))
    self.cells = np.flatnonzero(cell_area)
    self.cell_cumsum = np.cumsum(cell_area.ravel()[self.cells])
    self.cells_shape = cell_area.shape
    classes = np.where(in_val[..., None], 0, cell_counts).reshape(-1, cell_counts.shape[-1])
    self.cell_class_counts = classes[self.cells].astype(np.int64)

  def _count_cells(self, z: int) -> np.ndarray:
    """[cells_y, cells_x, classes] labelled-pixel counts of slice z."""
    k = len(self.volume.classes)
    labels = self.volume.read_labels(z)
    cells_x = len(self.cell_x) - 1
    column_cell = (np.searchsorted(self.cell_x, np.arange(labels.shape[1]), "right") - 1) * (k + 1)
    counts = []
    for y0, y1 in itertools.pairwise(self.cell_y):
      # Class k+1 collects 255 (and anything out of range), then is dropped.
      key = column_cell[None, :] + np.minimum(labels[y0:y1], k)
      counts.append(np.bincount(key.ravel(), minlength=cells_x * (k + 1)).reshape(cells_x, k + 1))
    return np.stack(counts)[..., :k]

  def _blocks_of_cells(self, cells: np.ndarray) -> np.ndarray:
    """Sums [..., cells_y, cells_x, ...] counts into [..., blocks_y, blocks_x, ...]."""
    first_y = np.searchsorted(self._cell_block_y, np.arange(len(self.block_y) - 1))
    first_x = np.searchsorted(self._cell_block_x, np.arange(len(self.block_x) - 1))
    return np.add.reduceat(np.add.reduceat(cells, first_y, axis=1), first_x, axis=2)

  def class_counts(self) -> np.ndarray:
    """[classes] int64 label histogram of the training pixels (validation blocks excluded)."""
    return self._class_counts.copy()

  def validation_blocks(self) -> list[tuple[int, int, int, int, int]]:
    """The validation blocks as (z, y0, y1, x0, x1), in slice then raster order."""
    out = []
    for s, by, bx in zip(*np.nonzero(self.val_blocks), strict=True):
      out.append(
        (
          self.train_slices[s],
          int(self.block_y[by]),
          int(self.block_y[by + 1]),
          int(self.block_x[bx]),
          int(self.block_x[bx + 1]),
        )
      )
    return out

  def val_pixels(self, z: int, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
    """[y1 - y0, x1 - x0] bool: which pixels of a window of slice z are validation pixels."""
    if z not in self.train_slices:
      return np.zeros((y1 - y0, x1 - x0), bool)
    blocks = self.val_blocks[self.train_slices.index(z)]
    by = np.searchsorted(self.block_y, np.arange(y0, y1), "right") - 1
    bx = np.searchsorted(self.block_x, np.arange(x0, x1), "right") - 1
    return blocks[np.ix_(by, bx)]

  def masks(self, eval_slices: Sequence[int]) -> dict[int, np.ndarray]:
    """Region of every labelled pixel of the annotated slices (reads their labels).

    Returns:
      {z: [y, x] uint8} with REGION_TRAIN, REGION_VALIDATION, REGION_EVALUATION for
      labelled pixels of training, validation and evaluation slices, REGION_UNLABELLED
      elsewhere.
    """
    masks = {}
    for z in sorted(self.volume.metadata.annotated_slices):
      labelled = self.volume.read_labels(z) != IGNORE_LABEL
      if z in eval_slices:
        region = np.full(labelled.shape, REGION_EVALUATION, np.uint8)
      else:
        region = np.where(
          self.val_pixels(z, 0, labelled.shape[0], 0, labelled.shape[1]),
          REGION_VALIDATION,
          REGION_TRAIN,
        ).astype(np.uint8)
      masks[z] = np.where(labelled, region, REGION_UNLABELLED).astype(np.uint8)
    return masks
