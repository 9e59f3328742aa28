"""Segmentation losses and pixel counts: class weights, cross-entropy, Dice, confusion, IoU.

Every function takes logits `[batch, y, x, classes]` and integer labels `[batch, y, x]` in
which `IGNORE_LABEL` (255) marks pixels that carry no label (unannotated, validation blocks
in a training batch, padding). Ignored pixels contribute neither to a loss nor to its
gradient, and a batch with no labelled pixel at all gives a loss of 0 with finite (zero)
gradients, so a step on such a batch is a no-op for the weights rather than a NaN.

The losses are pure `jax.numpy` and work under `jax.jit`. They compute in float32 whatever
the logits' dtype, so a bfloat16 model still gets a float32 loss.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from fibseg_jax.data.volume import IGNORE_LABEL


def _valid_and_safe(labels: jax.Array, ignore: int) -> tuple[jax.Array, jax.Array]:
  """(valid mask [b, y, x] bool, labels with ignored pixels set to class 0)."""
  labels = jnp.asarray(labels).astype(jnp.int32)
  valid = labels != ignore
  return valid, jnp.where(valid, labels, 0)


def _safe_ratio(num: jax.Array, den: jax.Array) -> jax.Array:
  """num / den, or 0 where den == 0, without a NaN in either branch's gradient."""
  positive = den > 0
  return jnp.where(positive, num / jnp.where(positive, den, 1.0), 0.0)


def cross_entropy(
  logits: jax.Array,
  labels: jax.Array,
  class_weights: jax.Array | np.ndarray | None = None,
  ignore: int = IGNORE_LABEL,
) -> jax.Array:
  """Weighted mean softmax cross-entropy over the labelled pixels.

  The mean is normalised by the sum of the weights of the labelled pixels, so with uniform
  weights it is the plain mean over labelled pixels, and re-weighting changes the balance
  between classes rather than the overall scale.

  Args:
    logits: [batch, y, x, classes], any float dtype.
    labels: [batch, y, x] integer class indices; `ignore` marks unlabelled pixels. Values
      other than 0..classes-1 and `ignore` are not checked here (the loader checks them).
    class_weights: optional [classes] weight per class, e.g. from `class_weights`.
    ignore: the label value to leave out.

  Returns:
    A float32 scalar; 0 when no pixel is labelled (or all labelled pixels weigh 0).
  """
  logits = jnp.asarray(logits, jnp.float32)
  valid, safe = _valid_and_safe(labels, ignore)
  log_p = jax.nn.log_softmax(logits, axis=-1)
  nll = -jnp.take_along_axis(log_p, safe[..., None], axis=-1)[..., 0]
  weight = valid.astype(jnp.float32)
  if class_weights is not None:
    weight = weight * jnp.asarray(class_weights, jnp.float32)[safe]
  return _safe_ratio(jnp.sum(weight * nll), jnp.sum(weight))


def soft_dice(
  logits: jax.Array,
  labels: jax.Array,
  ignore: int = IGNORE_LABEL,
  eps: float = 1e-6,
) -> jax.Array:
  """1 - mean soft Dice coefficient over the classes present in the batch's labels.

  Dice is pooled over the whole batch (all samples and pixels together) rather than per
  sample, so a class that fills a few pixels of one patch does not dominate the mean.
  Classes absent from the labels are left out of the mean: their Dice would be ~0 for any
  prediction and would only add a constant. Softmax probabilities of ignored pixels are
  masked out of both the intersection and the denominator.

  Args:
    logits: [batch, y, x, classes].
    labels: [batch, y, x] integer class indices, `ignore` = unlabelled.
    ignore: the label value to leave out.
    eps: smoothing added to numerator and denominator.

  Returns:
    A float32 scalar in [0, 1]; 0 when no pixel is labelled.
  """
  logits = jnp.asarray(logits, jnp.float32)
  num_classes = logits.shape[-1]
  valid, safe = _valid_and_safe(labels, ignore)
  mask = valid[..., None].astype(jnp.float32)
  prob = jax.nn.softmax(logits, axis=-1) * mask
  truth = jax.nn.one_hot(safe, num_classes, dtype=jnp.float32) * mask
  axes = tuple(range(logits.ndim - 1))
  intersection = jnp.sum(prob * truth, axis=axes)
  denominator = jnp.sum(prob, axis=axes) + jnp.sum(truth, axis=axes)
  dice = (2.0 * intersection + eps) / (denominator + eps)
  present = (jnp.sum(truth, axis=axes) > 0).astype(jnp.float32)
  mean_dice = _safe_ratio(jnp.sum(present * dice), jnp.sum(present))
  return jnp.where(jnp.sum(present) > 0, 1.0 - mean_dice, 0.0)


def segmentation_loss(
  logits: jax.Array,
  labels: jax.Array,
  class_weights: jax.Array | np.ndarray | None = None,
  dice_weight: float = 1.0,
  ignore: int = IGNORE_LABEL,
) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Cross-entropy plus `dice_weight` times soft Dice loss.

  Args:
    logits: [batch, y, x, classes].
    labels: [batch, y, x] integer class indices, `ignore` = unlabelled.
    class_weights: optional [classes] weights for the cross-entropy term (Dice is already
      balanced across classes).
    dice_weight: weight of the Dice term; 0 gives pure cross-entropy.
    ignore: the label value to leave out.

  Returns:
    (loss scalar, {"ce": cross-entropy scalar, "dice": Dice loss scalar}).
  """
  ce = cross_entropy(logits, labels, class_weights, ignore)
  dice = soft_dice(logits, labels, ignore)
  return ce + dice_weight * dice, {"ce": ce, "dice": dice}


def deep_supervision_weights(levels: int) -> np.ndarray:
  """nnU-Net's loss weights of the decoder levels: 1 / 2**l, the lowest level 0, sum 1.

  Level l (0 = full resolution) weighs 1 / 2**l; the lowest-resolution level weighs 0
  (unless it is the only one), and the weights are normalised to sum to 1. The models
  give heads only to the levels of non-zero weight (`models.supervised_levels`).

  Args:
    levels: decoder levels, the model's depth.

  Returns:
    [levels] float32 weights, e.g. [4/7, 2/7, 1/7, 0] for 4 levels.
  """
  if levels < 1:
    raise ValueError(f"deep supervision needs at least one decoder level, got {levels}")
  weights = 1.0 / 2.0 ** np.arange(levels)
  if levels > 1:
    weights[-1] = 0.0
  return (weights / weights.sum()).astype(np.float32)


def downsample_labels(labels: jax.Array, factor: int) -> jax.Array:
  """Labels of a level `factor` times coarser, by strided nearest-neighbour subsampling.

  Each coarse pixel takes the label of one fine pixel (the one nearest the centre of its
  `factor` x `factor` block), so no new class is invented and `IGNORE_LABEL` stays.

  Args:
    labels: [batch, y, x] integer class indices; y and x multiples of `factor`.
    factor: a power of two, 1 returns `labels`.

  Returns:
    [batch, y / factor, x / factor] of the same dtype.
  """
  if factor == 1:
    return labels
  offset = factor // 2
  return labels[:, offset::factor, offset::factor]


def deep_supervision_loss(
  outputs: Sequence[jax.Array],
  labels: jax.Array,
  level_weights: Sequence[float] | np.ndarray,
  class_weights: jax.Array | np.ndarray | None = None,
  dice_weight: float = 1.0,
  ignore: int = IGNORE_LABEL,
) -> tuple[jax.Array, dict[str, jax.Array]]:
  """`segmentation_loss` at every decoder level against subsampled labels, weighted.

  Args:
    outputs: logits per decoder level, full resolution first: entry l is
      [batch, y / 2**l, x / 2**l, classes] (`model.apply(..., deep_supervision=True)`).
    labels: [batch, y, x] integer class indices, `ignore` = unlabelled.
    level_weights: weight per level (`deep_supervision_weights`); levels beyond
      `outputs` must weigh 0.
    class_weights: optional [classes] cross-entropy weights, at every level.
    dice_weight: weight of the Dice term, at every level.
    ignore: the label value to leave out.

  Returns:
    (weighted loss scalar, {"ce", "dice": the full-resolution terms, "loss_level{l}": the
    loss of each lower level l}).

  Raises:
    ValueError: an output's size does not match its level, or a level without an output
      has a non-zero weight.
  """
  level_weights = np.asarray(level_weights, np.float64)
  if np.any(level_weights[len(outputs) :] != 0) or len(outputs) > len(level_weights):
    raise ValueError(f"{len(outputs)} outputs for level weights {level_weights.tolist()}")
  total = jnp.zeros((), jnp.float32)
  metrics: dict[str, jax.Array] = {}
  for level, logits in enumerate(outputs):
    factor = 2**level
    target = downsample_labels(labels, factor)
    if logits.shape[1:3] != target.shape[1:3]:
      raise ValueError(
        f"level {level} logits {logits.shape} do not fit labels {labels.shape} / {factor}"
      )
    loss, parts = segmentation_loss(logits, target, class_weights, dice_weight, ignore)
    if level == 0:
      metrics.update(parts)
    else:
      metrics[f"loss_level{level}"] = loss
    total = total + float(level_weights[level]) * loss
  return total, metrics


def confusion_matrix(
  logits: jax.Array,
  labels: jax.Array,
  num_classes: int | None = None,
  ignore: int = IGNORE_LABEL,
) -> jax.Array:
  """Pixel counts of (true class, predicted class) over the labelled pixels.

  Jittable as is (`num_classes` defaults to the logits' last axis, a static shape). The
  counts are int32: sum batches into an int64 numpy array when counting a whole volume.

  Args:
    logits: [batch, y, x, classes] (or any [..., classes]).
    labels: [batch, y, x] integer class indices, `ignore` = unlabelled.
    num_classes: number of classes; defaults to logits.shape[-1].
    ignore: the label value to leave out.

  Returns:
    [num_classes, num_classes] int32; rows are the true class, columns the prediction.
  """
  k = logits.shape[-1] if num_classes is None else int(num_classes)
  valid, safe = _valid_and_safe(labels, ignore)
  pred = jnp.argmax(logits, axis=-1).astype(jnp.int32)
  index = (safe * k + pred).reshape(-1)
  counts = jnp.bincount(index, weights=valid.reshape(-1).astype(jnp.int32), length=k * k)
  return counts.astype(jnp.int32).reshape(k, k)


def iou_from_confusion(confusion: np.ndarray | jax.Array) -> tuple[np.ndarray, float]:
  """Per-class intersection over union and its mean.

  Args:
    confusion: [classes, classes] counts, rows truth, columns prediction.

  Returns:
    (iou [classes] float64 with NaN for a class absent from both truth and prediction,
    mean IoU over the non-NaN classes; NaN if every class is NaN).
  """
  cm = np.asarray(confusion, np.float64)
  if cm.ndim != 2 or cm.shape[0] != cm.shape[1]:
    raise ValueError(f"confusion matrix must be square [classes, classes], got {cm.shape}")
  tp = np.diag(cm)
  union = cm.sum(0) + cm.sum(1) - tp
  iou = np.full(tp.shape, np.nan)
  np.divide(tp, union, out=iou, where=union > 0)
  present = ~np.isnan(iou)
  return iou, float(iou[present].mean()) if present.any() else float("nan")


def consistency(
  student_logits: jax.Array,
  teacher_logits: jax.Array,
  mode: str = "pseudo",
  threshold: float = 0.9,
  class_weights: jax.Array | np.ndarray | None = None,
) -> tuple[jax.Array, jax.Array]:
  """Unsupervised loss of a student's prediction against a teacher's, per pixel.

  Gradients flow into `student_logits` only; the teacher's are stopped here.

  Args:
    student_logits: [batch, y, x, classes].
    teacher_logits: [batch, y, x, classes] of the same pixels.
    mode: "pseudo": cross-entropy against the teacher's arg-max where its top probability
      is at least `threshold` (FixMatch's rule), averaged over all pixels so that a less
      confident teacher teaches less; "soft": squared difference of the softmax
      probabilities summed over classes (mean teacher's consistency), averaged over pixels.
    threshold: confidence needed for a pseudo-label ("pseudo" only).
    class_weights: optional [classes] weights of the pseudo-labels' classes ("pseudo"
      only), as in the supervised cross-entropy.

  Returns:
    (loss float32 scalar, fraction of pixels that teach: confident ones for "pseudo",
    all for "soft").
  """
  student = jnp.asarray(student_logits, jnp.float32)
  teacher = jax.nn.softmax(jax.lax.stop_gradient(jnp.asarray(teacher_logits, jnp.float32)), -1)
  if mode == "soft":
    diff = jax.nn.softmax(student, -1) - teacher
    return jnp.mean(jnp.sum(diff * diff, -1)), jnp.ones((), jnp.float32)
  if mode != "pseudo":
    raise ValueError(f"consistency mode {mode!r}: expected 'pseudo' or 'soft'")
  confident = (jnp.max(teacher, -1) >= threshold).astype(jnp.float32)
  pseudo = jnp.argmax(teacher, -1)
  nll = -jnp.take_along_axis(jax.nn.log_softmax(student, -1), pseudo[..., None], -1)[..., 0]
  weight = jnp.ones_like(nll)
  if class_weights is not None:
    weight = jnp.asarray(class_weights, jnp.float32)[pseudo]
  loss = _safe_ratio(jnp.sum(confident * weight * nll), jnp.sum(weight))
  return loss, jnp.mean(confident)


def soft_cross_entropy(logits: jax.Array, targets: jax.Array) -> jax.Array:
  """Cross-entropy of a student's logits to a teacher's class probabilities (distillation).

  -sum_c t_c log softmax(s)_c, averaged over the pixels whose targets sum to more than 0
  (the loader gives 0 outside the volume and where the teacher wrote nothing). Its
  gradient is softmax(s) - t, as the KL divergence's to the teacher.

  Args:
    logits: [batch, y, x, classes].
    targets: [batch, y, x, classes] probabilities, each pixel's summing to 1 or 0;
      treated as constants.

  Returns:
    float32 scalar; 0 when no pixel has a target.
  """
  targets = jax.lax.stop_gradient(jnp.asarray(targets, jnp.float32))
  log_p = jax.nn.log_softmax(jnp.asarray(logits, jnp.float32), -1)
  per_pixel = -jnp.sum(targets * log_p, -1)
  taught = (jnp.sum(targets, -1) > 0).astype(jnp.float32)
  return _safe_ratio(jnp.sum(per_pixel * taught), jnp.sum(taught))


def class_weights(counts: Sequence[int] | np.ndarray) -> np.ndarray:
  """Inverse-square-root-frequency class weights, mean 1 over the classes present.

  1/sqrt(n) rather than 1/n: rare phases (e.g. pores in cement paste) gain weight without
  letting a few hundred pixels outweigh the bulk phases. Classes with no training pixels
  get weight 0; they cannot appear in a training batch, and 0 keeps them from bending the
  normalisation.

  Args:
    counts: [classes] training-pixel count per class, `loader.SlabLoader.class_counts()`.

  Returns:
    [classes] float32 weights.

  Raises:
    ValueError: if counts is not 1-D, has a negative entry, or is all zero.
  """
  counts = np.asarray(counts, np.float64)
  if counts.ndim != 1 or (counts < 0).any():
    raise ValueError(f"class counts must be a 1-D array of non-negative counts, got {counts}")
  present = counts > 0
  if not present.any():
    raise ValueError("class counts are all zero: there are no labelled training pixels")
  weights = np.zeros_like(counts)
  weights[present] = 1.0 / np.sqrt(counts[present])
  weights[present] /= weights[present].mean()
  return weights.astype(np.float32)
