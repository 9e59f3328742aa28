"""Segmentation metrics from a confusion matrix, and phase volume fractions.

Conventions (the same as scikit-learn's): rows of the confusion matrix are the truth,
columns the prediction; voxels whose truth is `ignore` (255, not annotated) are left
out. A per-class score whose denominator is 0 is NaN, not 0: IoU and Dice of a class
absent from both truth and prediction, precision of a class never predicted, recall of
a class absent from the truth. NaN classes are excluded from the means (np.nanmean),
so a phase that does not occur on the evaluated slices neither helps nor hurts. This is
scikit-learn with ``zero_division=np.nan``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import numpy as np

from fibseg_jax.data import volume as volume_lib

IGNORE_LABEL = volume_lib.IGNORE_LABEL


class MetricsError(ValueError):
  """Arrays that cannot be compared: shapes differ or labels are out of range."""


def confusion_matrix(
  truth: np.ndarray, prediction: np.ndarray, num_classes: int, ignore: int = IGNORE_LABEL
) -> np.ndarray:
  """Counts of (truth class, predicted class) over the annotated voxels.

  Args:
    truth: integer labels of any shape, e.g. [y, x]; `ignore` = not annotated.
    prediction: integer labels, the same shape.
    num_classes: C; valid labels are 0..C-1.
    ignore: truth value that is left out.

  Returns:
    int64 [C, C]; entry [i, j] counts voxels of truth i predicted as j.

  Raises:
    MetricsError: shapes differ, or an annotated voxel holds a label outside 0..C-1 in
      the truth or the prediction.
  """
  truth, prediction = np.asarray(truth), np.asarray(prediction)
  if truth.shape != prediction.shape:
    raise MetricsError(f"truth shape {truth.shape} != prediction shape {prediction.shape}")
  mask = truth != ignore
  t = truth[mask].astype(np.int64)
  p = prediction[mask].astype(np.int64)
  for name, values in (("truth", t), ("prediction", p)):
    if values.size and (values.min() < 0 or values.max() >= num_classes):
      bad = np.unique(values[(values < 0) | (values >= num_classes)])[:5]
      raise MetricsError(
        f"{name} holds labels {bad.tolist()} outside 0..{num_classes - 1} on annotated voxels"
      )
  return np.bincount(t * num_classes + p, minlength=num_classes * num_classes).reshape(
    num_classes, num_classes
  )


def class_counts(labels: np.ndarray, num_classes: int, ignore: int = IGNORE_LABEL) -> np.ndarray:
  """Voxels per class, int64 [C]; `ignore` and values >= C are not counted."""
  counts = np.bincount(np.asarray(labels).ravel(), minlength=max(num_classes, ignore + 1))
  return counts[:num_classes].astype(np.int64)


def fractions(counts: np.ndarray) -> np.ndarray:
  """Phase volume fractions [C] from voxel counts (NaN when there are no voxels)."""
  counts = np.asarray(counts, np.float64)
  total = counts.sum()
  return counts / total if total > 0 else np.full(counts.shape, np.nan)


def _ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
  num, den = np.asarray(num, np.float64), np.asarray(den, np.float64)
  out = np.full(num.shape, np.nan)
  np.divide(num, den, out=out, where=den > 0)
  return out


@dataclasses.dataclass(frozen=True)
class SegmentationMetrics:
  """Scores of a prediction against the truth, all computed from `confusion`.

  Attributes:
    confusion: int64 [C, C], rows truth, columns prediction.
    iou: [C] intersection over union (Jaccard), NaN where the class is in neither.
    dice: [C] Dice coefficient = F1 score, NaN likewise.
    precision: [C] NaN where the class is never predicted.
    recall: [C] NaN where the class is absent from the truth.
    accuracy: fraction of annotated voxels labelled correctly.
    mean_iou: mean of the non-NaN IoUs.
    mean_dice: mean of the non-NaN Dice scores.
    truth_fractions: [C] phase fractions of the truth on the annotated voxels.
    predicted_fractions: [C] phase fractions of the prediction on the same voxels.
  """

  confusion: np.ndarray
  iou: np.ndarray
  dice: np.ndarray
  precision: np.ndarray
  recall: np.ndarray
  accuracy: float
  mean_iou: float
  mean_dice: float
  truth_fractions: np.ndarray
  predicted_fractions: np.ndarray

  @property
  def num_classes(self) -> int:
    return self.confusion.shape[0]

  @property
  def voxels(self) -> int:
    """Annotated voxels compared."""
    return int(self.confusion.sum())

  def to_json(self, classes: Sequence[str]) -> dict[str, Any]:
    """A JSON-ready dict with per-class entries keyed by name; NaN becomes None."""
    per_class = {}
    for i, name in enumerate(classes):
      per_class[name] = {
        "iou": _num(self.iou[i]),
        "dice": _num(self.dice[i]),
        "precision": _num(self.precision[i]),
        "recall": _num(self.recall[i]),
        "truth_voxels": int(self.confusion[i].sum()),
        "predicted_voxels": int(self.confusion[:, i].sum()),
        "truth_fraction": _num(self.truth_fractions[i]),
        "predicted_fraction": _num(self.predicted_fractions[i]),
      }
    return {
      "voxels": self.voxels,
      "accuracy": _num(self.accuracy),
      "mean_iou": _num(self.mean_iou),
      "mean_dice": _num(self.mean_dice),
      "per_class": per_class,
      "confusion_matrix": self.confusion.tolist(),
    }


def _num(value: float) -> float | None:
  value = float(value)
  return None if np.isnan(value) else value


def _nanmean(values: np.ndarray) -> float:
  values = np.asarray(values, np.float64)
  return float(values[~np.isnan(values)].mean()) if np.any(~np.isnan(values)) else float("nan")


def metrics_from_confusion(confusion: np.ndarray) -> SegmentationMetrics:
  """Per-class and overall scores from a confusion matrix [C, C] (rows truth).

  Raises:
    MetricsError: the matrix is not square.
  """
  confusion = np.asarray(confusion, np.int64)
  if confusion.ndim != 2 or confusion.shape[0] != confusion.shape[1]:
    raise MetricsError(f"confusion matrix must be [C, C], got shape {confusion.shape}")
  tp = np.diag(confusion)
  truth = confusion.sum(1)
  predicted = confusion.sum(0)
  fp, fn = predicted - tp, truth - tp
  iou = _ratio(tp, tp + fp + fn)
  dice = _ratio(2 * tp, 2 * tp + fp + fn)
  total = confusion.sum()
  return SegmentationMetrics(
    confusion=confusion,
    iou=iou,
    dice=dice,
    precision=_ratio(tp, predicted),
    recall=_ratio(tp, truth),
    accuracy=float(tp.sum() / total) if total else float("nan"),
    mean_iou=_nanmean(iou),
    mean_dice=_nanmean(dice),
    truth_fractions=fractions(truth),
    predicted_fractions=fractions(predicted),
  )


def segmentation_metrics(
  truth: np.ndarray, prediction: np.ndarray, num_classes: int, ignore: int = IGNORE_LABEL
) -> SegmentationMetrics:
  """`metrics_from_confusion(confusion_matrix(...))`; see both."""
  return metrics_from_confusion(confusion_matrix(truth, prediction, num_classes, ignore))


class StackFractions:
  """Streaming phase fractions of a label stack, slice by slice.

  Example:
    acc = StackFractions(num_classes=4)
    for z in range(depth):
      acc.add(z, labels[z])
    acc.fractions()          # [C] over the whole stack
    acc.slice_fractions()    # [slices, C], one row per added slice (a z profile)
  """

  def __init__(self, num_classes: int, ignore: int = IGNORE_LABEL):
    self.num_classes = num_classes
    self.ignore = ignore
    self.z: list[int] = []
    self._counts: list[np.ndarray] = []
    self.unlabelled = 0

  def add(self, z: int, labels: np.ndarray) -> None:
    """Adds one slice [y, x] (or any shape); `ignore` voxels count as unlabelled."""
    counts = class_counts(labels, self.num_classes, self.ignore)
    self.z.append(int(z))
    self._counts.append(counts)
    self.unlabelled += int(np.asarray(labels).size - counts.sum())

  def counts(self) -> np.ndarray:
    """int64 [C] voxels per class over every added slice."""
    if not self._counts:
      return np.zeros(self.num_classes, np.int64)
    return np.sum(self._counts, axis=0)

  def fractions(self) -> np.ndarray:
    """[C] phase fractions over every added slice."""
    return fractions(self.counts())

  def slice_fractions(self) -> np.ndarray:
    """[slices, C] phase fractions of each added slice, in the order added."""
    if not self._counts:
      return np.zeros((0, self.num_classes))
    return np.stack([fractions(c) for c in self._counts])
