"""Multi-Otsu thresholding of the detector signals, matched to the annotated classes.

Each channel of a slice is cut by its own multi-Otsu thresholds (`threshold_multiotsu`
with k = the number of classes, on that slice's histogram, as one thresholds an image
by hand), so every pixel falls in one of k**C intensity cells for C channels. The cells
are named after the annotated classes by mean intensity: over the annotated training
pixels, each cell's mean vector [C] is matched to the classes' mean vectors [k, C] --
one to one (Hungarian assignment) for a single channel, where cells and classes are
both k, and to the nearest class mean for several channels, where the k**C cells are
more than the classes. A cell no training pixel fell in is named on each slice it
occurs in, by the nearest class mean to its mean on that slice.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy import optimize
from skimage import filters

from fibseg_jax.data import volume as volume_lib

IGNORE_LABEL = volume_lib.IGNORE_LABEL


def channel_thresholds(channel: np.ndarray, classes: int, nbins: int = 256) -> np.ndarray:
  """Multi-Otsu thresholds of one channel [y, x]: [classes - 1] increasing values.

  A channel with too few distinct values for multi-Otsu falls back to its quantiles.
  """
  values = np.asarray(channel, np.float32)
  try:
    return np.asarray(filters.threshold_multiotsu(values, classes=classes, nbins=nbins))
  except ValueError:
    return np.quantile(values, np.arange(1, classes) / classes).astype(np.float32)


class MultiOtsu:
  """Per-slice multi-Otsu cells of every channel, named after the annotated classes.

  Attributes:
    num_classes: k, the number of classes (and of Otsu classes per channel).
    class_means: [k, C] mean of each class over the training pixels (NaN: class absent).
    cell_classes: [k**C] class of each intensity cell, -1 where no training pixel fell.
  """

  def __init__(self, num_classes: int, *, nbins: int = 256):
    if num_classes < 2:
      raise ValueError(f"MultiOtsu needs at least 2 classes, got {num_classes}")
    self.num_classes = int(num_classes)
    self.nbins = int(nbins)
    self.class_means: np.ndarray | None = None
    self.cell_classes: np.ndarray | None = None

  @property
  def num_parameters(self) -> int:
    """Fitted numbers: the cell-to-class table and the class means."""
    if self.cell_classes is None:
      return 0
    return int(self.cell_classes.size + self.class_means.size)

  def cells(self, image: np.ndarray) -> np.ndarray:
    """Intensity cell of every pixel of a slice [y, x, C]: int64 [y, x] in 0..k**C - 1."""
    k = self.num_classes
    cell = np.zeros(image.shape[:2], np.int64)
    for c in range(image.shape[-1]):
      bins = np.digitize(image[..., c], channel_thresholds(image[..., c], k, self.nbins))
      cell += bins.astype(np.int64) * k**c
    return cell

  def fit(self, images: Sequence[np.ndarray], labels: Sequence[np.ndarray]) -> MultiOtsu:
    """Matches the intensity cells of the training slices to their annotated classes.

    Args:
      images: training slices [y, x, C], float, in comparable units across channels
        (e.g. normalised to [-1, 1] by per-channel percentiles).
      labels: their labels [y, x] uint8; 255 = not a training pixel.

    Returns:
      self.

    Raises:
      ValueError: no training pixel at all.
    """
    k = self.num_classes
    channels = images[0].shape[-1]
    n_cells = k**channels
    cell_sum = np.zeros((n_cells, channels))
    cell_count = np.zeros(n_cells)
    class_sum = np.zeros((k, channels))
    class_count = np.zeros(k)
    for image, label in zip(images, labels, strict=True):
      mask = label != IGNORE_LABEL
      if not mask.any():
        continue
      values = image[mask].astype(np.float64)
      cell = self.cells(image)[mask]
      cls = label[mask].astype(np.int64)
      cell_count += np.bincount(cell, minlength=n_cells)
      class_count += np.bincount(cls, minlength=k)[:k]
      for c in range(channels):
        cell_sum[:, c] += np.bincount(cell, values[:, c], minlength=n_cells)
        class_sum[:, c] += np.bincount(cls, values[:, c], minlength=k)[:k]
    if class_count.sum() == 0:
      raise ValueError("MultiOtsu.fit: the training slices hold no labelled pixel")
    with np.errstate(invalid="ignore", divide="ignore"):
      self.class_means = class_sum / class_count[:, None]
      cell_means = cell_sum / cell_count[:, None]
    seen = cell_count > 0
    present = np.flatnonzero(class_count > 0)
    table = np.full(n_cells, -1, np.int64)
    distance = np.linalg.norm(
      cell_means[:, None, :] - self.class_means[None, present, :], axis=-1
    )  # [cells, present classes]
    if channels == 1:
      rows = np.flatnonzero(seen)
      r, c = optimize.linear_sum_assignment(distance[rows])
      table[rows[r]] = present[c]
      # More seen cells than present classes: the rest go to the nearest class.
      left = rows[np.isin(rows, rows[r], invert=True)]
      table[left] = present[np.argmin(distance[left], axis=1)]
    else:
      table[seen] = present[np.argmin(distance[seen], axis=1)]
    self.cell_classes = table
    self._present = present
    return self

  def predict(self, image: np.ndarray) -> np.ndarray:
    """Labels of a slice [y, x, C] (same units as in `fit`): uint8 [y, x]."""
    if self.cell_classes is None:
      raise ValueError("MultiOtsu.predict called before fit")
    cell = self.cells(image)
    table = self.cell_classes.copy()
    unseen = np.flatnonzero(table < 0)
    if unseen.size:
      # Cells no training pixel fell in: name them by their mean on this slice.
      flat = image.reshape(-1, image.shape[-1]).astype(np.float64)
      count = np.bincount(cell.ravel(), minlength=table.size)
      for u in unseen[count[unseen] > 0]:
        mean = flat[cell.ravel() == u].mean(0)
        d = np.linalg.norm(self.class_means[self._present] - mean, axis=-1)
        table[u] = self._present[np.argmin(d)]
      table[table < 0] = self._present[0]  # cells absent from this slice too
    return table[cell].astype(np.uint8)
