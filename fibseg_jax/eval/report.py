"""Evaluation of a segmented stack against hand labels (`evaluate` -> `Report`).

  report = evaluate("seg.zarr", "vol.zarr", slices=[20])
  paths = render.write_report(report, "report/")  # report.json, report.md, figures

Inputs are opened by `fibseg_jax.eval.inputs`, the files written by
`fibseg_jax.eval.render`.

Scores are computed on the chosen slices; predicted phase fractions are also computed
over the whole stack, streaming slice by slice, with a profile along z. The predicted
microstructure is quantified per phase (connectivity, percolation, surface density, and
the pore-size distribution; see `fibseg_jax.eval.quantify`) on the whole stack when it
fits `max_voxels`, else on a centred subvolume, which the report names.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from typing import Any

import numpy as np
import tensorstore as ts

from fibseg_jax.data import lists
from fibseg_jax.data import volume as volume_lib
from fibseg_jax.eval import calibration, metrics, quantify
from fibseg_jax.eval.inputs import (
  NOT_SEGMENTED,
  EvaluationError,
  Prediction,
  Truth,
  open_image,
  open_prediction,
  open_truth,
  truth_slice_numbers,
)

# How a materials scientist names the fraction of a phase (matched in class names).
PHASE_QUANTITIES = (("pore", "porosity"), ("clinker", "unhydrated fraction"), ("unhydrated", ""))


@dataclasses.dataclass
class Report:
  """Everything an evaluation found; `render.write_report` turns it into files.

  Attributes:
    prediction: the opened prediction.
    truth: the opened truth.
    classes: class names; label i is classes[i].
    slices: evaluated slice indices.
    overall: scores over every evaluated slice together.
    per_slice: z -> scores of that slice.
    stack: predicted phase fractions over the whole stack, slice by slice.
    image: the volume shown in the figures, or None.
    voxel_size_nm: (z, y, x), or None when unknown.
    structure: per-phase connectivity, surface and sizes of the prediction, or None
      (not asked for, or the voxel size is unknown).
    intervals: the range of each structure quantity over `members` segmentations of the
      same stack (`quantify.intervals`), or None when none were given.
    numbering: the user's slice numbers (`volume_lib.SliceNumbers`) of the truth volume,
      else of the prediction's source volume; number = z when neither has them. Every
      slice in report.json, report.md and a file name is one of these numbers.
  """

  prediction: Prediction
  truth: Truth
  classes: tuple[str, ...]
  slices: tuple[int, ...]
  overall: metrics.SegmentationMetrics
  per_slice: dict[int, metrics.SegmentationMetrics]
  stack: metrics.StackFractions
  image: volume_lib.Volume | None
  voxel_size_nm: tuple[float, float, float] | None
  structure: quantify.Quantification | None = None
  intervals: dict[str, Any] | None = None
  numbering: volume_lib.SliceNumbers | None = None

  @property
  def numbers(self) -> volume_lib.SliceNumbers:
    return self.numbering or volume_lib.SliceNumbers.of((), self.prediction.shape[0])

  @property
  def whole_stack(self) -> bool:
    """Whether every voxel of the prediction is segmented."""
    return self.stack.unlabelled == 0

  def stack_scope(self) -> str:
    """What the stack fractions cover: "whole stack", or the segmented part of it."""
    if self.whole_stack:
      return "whole stack"
    total = int(np.prod(self.prediction.shape))
    done = 1 - self.stack.unlabelled / total if total else 0.0
    return f"segmented part ({100 * done:.0f}% of the stack)"

  def to_json(self) -> dict[str, Any]:
    """The contents of report.json (NaN written as null)."""
    stack_fracs = self.stack.fractions()
    return {
      "prediction": volume_lib.describe(self.prediction.path),
      "truth": self.truth.description,
      "model": self.prediction.run.get("checkpoint"),
      "classes": list(self.classes),
      "slice_numbering": "the numbers of the stack's files (as ingest read them)",
      "slices": self.numbers.labels(self.slices),
      "overall": self.overall.to_json(self.classes),
      "per_slice": {
        str(self.numbers.label(z)): m.to_json(self.classes) for z, m in self.per_slice.items()
      },
      "stack": {
        "shape": list(self.prediction.shape),
        "voxel_size_nm": list(self.voxel_size_nm) if self.voxel_size_nm else None,
        "predicted_fractions": {n: _num(stack_fracs[i]) for i, n in enumerate(self.classes)},
        "not_segmented_voxels": int(self.stack.unlabelled),
        "fractions_over": self.stack_scope(),
        "per_slice_fractions": {
          str(self.numbers.label(z)): [_num(v) for v in row]
          for z, row in zip(self.stack.z, self.stack.slice_fractions(), strict=True)
        },
      },
      "phase_quantities": self.phase_quantities(),
      "structure": self.structure.to_json() if self.structure else None,
      "intervals": self.intervals,
    }

  def phase_quantities(self) -> dict[str, dict[str, Any]]:
    """Named quantities (porosity, unhydrated fraction) for the classes that have one."""
    out = {}
    stack_fracs = self.stack.fractions()
    for i, name in enumerate(self.classes):
      quantity = _quantity(name)
      if quantity:
        out[quantity] = {
          "class": name,
          "truth": _num(self.overall.truth_fractions[i]),
          "predicted": _num(self.overall.predicted_fractions[i]),
          "predicted_whole_stack": _num(stack_fracs[i]),
        }
    return out


def _quantity(name: str) -> str:
  lower = name.lower()
  for key, quantity in PHASE_QUANTITIES:
    if key in lower:
      return quantity or "unhydrated fraction"
  return ""


def _num(value: float) -> float | None:
  value = float(value)
  return None if np.isnan(value) else value


def parse_slices(value: str | Sequence[int] | None, flag: str = "--slices") -> tuple[int, ...]:
  """'9', '9,40' or '0-10' (inclusive) -> sorted unique slice indices; None -> ()."""
  if value is None or value == "":
    return ()
  if not isinstance(value, str):
    return tuple(sorted({int(v) for v in value}))
  expected = "slice numbers like 9, 9,40 or 0-10"
  out = lists.parse_list(
    value, int, flag=flag, error=EvaluationError, expected=expected, ranges=True
  )
  return tuple(sorted(set(out)))


def _resolve_classes(prediction: Prediction, truth: Truth) -> tuple[str, ...]:
  if prediction.classes and truth.classes and prediction.classes != truth.classes:
    raise EvaluationError(
      f"--prediction has classes {list(prediction.classes)} but --truth "
      f"{truth.description} has {list(truth.classes)}; they must name the same phases in "
      "the same order"
    )
  return prediction.classes or truth.classes


def evaluate(
  prediction: Any,
  truth: Any,
  slices: Sequence[int] | str | None = None,
  *,
  image: Any | None = None,
  structure: bool = True,
  max_voxels: int = quantify.DEFAULT_MAX_VOXELS,
  size_classes: Sequence[str] | None = None,
  members: Sequence[Any] = (),
  labels_unlabelled: int | None = None,
) -> Report:
  """Scores a segmented stack against hand labels and measures its phase fractions.

  Args:
    prediction: the label array [z, y, x] uint8 (`fibseg segment` --output), or a `Prediction`.
    truth: a volume root or a glob of label images (see `open_truth`), or a `Truth`.
    slices: slices to score, in the user's slice numbers (`Report.numbering`); default
      every slice the truth labels.
    image: volume whose channels the figures show; default the truth volume, else the
      prediction's source volume.
    structure: quantify the predicted microstructure (`quantify.quantify_stack`).
    max_voxels: the largest subvolume quantified, in voxels.
    size_classes: classes that get a pore-size distribution; default those named like
      pores ("pore", "void").
    members: other segmentations of the same stack (label arrays: each ensemble
      member's or TTA pass's, `fibseg segment` run per workdir); with >= 2 (the
      prediction counts as one if it is not among them), every structure quantity gets
      an interval over them (`Report.intervals`). Needs `structure`.
    labels_unlabelled: for a glob of label images, the value meaning "not annotated":
      255 (default) or 0 (napari, ilastik), as for `fibseg ingest` (`open_truth`).

  Returns:
    A `Report`.

  Raises:
    EvaluationError: shapes differ, a slice is out of range or has no labels, the
      classes disagree, or the prediction is unfinished on an evaluated slice.
  """
  pred = prediction if isinstance(prediction, Prediction) else open_prediction(prediction)
  if not isinstance(truth, Truth):
    truth = open_truth(truth, truth_slice_numbers(truth, pred), labels_unlabelled)
  tru = truth
  depth, height, width = pred.shape
  if tru.shape[0] is not None and tuple(tru.shape) != pred.shape:
    raise EvaluationError(
      f"--prediction {volume_lib.describe(pred.path)} is {list(pred.shape)} [z, y, x] but "
      f"--truth {tru.description} is {list(tru.shape)}"
    )
  if tuple(tru.shape[1:]) != (height, width):
    raise EvaluationError(
      f"--truth label images are {list(tru.shape[1:])} [y, x] but the slices of "
      f"--prediction {volume_lib.describe(pred.path)} are {[height, width]}"
    )
  classes = _resolve_classes(pred, tru)
  if tru.volume is not None:
    numbering = tru.volume.metadata.numbering
  else:
    numbering = volume_lib.slice_numbering(pred.source, depth)
  slices = parse_slices(slices) if isinstance(slices, str) or slices is None else slices
  try:
    slices = numbering.to_zs(sorted(set(int(n) for n in slices)), "--slices")
  except volume_lib.VolumeError as e:
    raise EvaluationError(str(e)) from None
  chosen = bool(slices)  # by the user; else every labelled slice, skipping empty files
  slices = slices or tru.slices
  if not slices:
    raise EvaluationError(f"--truth {tru.description} has no annotated slices; nothing to score")
  missing = [z for z in slices if z not in tru.slices]
  if missing:
    raise EvaluationError(
      f"--slices: {numbering.labels(missing)} have no labels in --truth {tru.description} "
      f"(labelled: {numbering.labels(tru.slices)})"
    )

  if not classes:
    # No names anywhere: number the classes up to the largest label seen.
    top = max(_max_label([tru.read(z) for z in slices]), _max_label(pred.array))
    classes = tuple(f"class{i}" for i in range(top + 1))
  num_classes = len(classes)

  per_slice = {}
  for z in slices:
    t = tru.read(z)
    p = pred.array[z].read().result()
    annotated = t != NOT_SEGMENTED
    if not annotated.any() and not chosen:
      continue  # a label file with nothing painted on it
    if not annotated.any():
      raise EvaluationError(
        f"--slices: slice {numbering.label(z)} of --truth {tru.description} has no labels"
      )
    unfinished = int(np.count_nonzero(p[annotated] == NOT_SEGMENTED))
    if unfinished:
      raise EvaluationError(
        f"--prediction {volume_lib.describe(pred.path)}: slice {numbering.label(z)} has "
        f"{unfinished} annotated voxels that are not segmented yet; rerun `fibseg segment` "
        "to finish it"
      )
    try:
      per_slice[z] = metrics.segmentation_metrics(t, p, num_classes)
    except metrics.MetricsError as e:
      hint = ""
      if labels_unlabelled is None and tru.volume is None and np.any(t == 0):
        # 0..K with K classes: napari-style labels read as 255 = not annotated.
        hint = (
          "; if 0 means not painted in the label files (napari, ilastik), pass "
          "--labels_unlabelled=0 as for `fibseg ingest`"
        )
      raise EvaluationError(f"--truth: slice {numbering.label(z)}: {e}{hint}") from e
  if not per_slice:
    raise EvaluationError(
      f"--truth {tru.description}: no labelled pixel on any slice"
      + (
        "; if 0 means not painted there, pass --labels_unlabelled=0"
        if labels_unlabelled is None and tru.volume is None
        else ""
      )
    )
  slices = tuple(per_slice)
  overall = metrics.metrics_from_confusion(sum(m.confusion for m in per_slice.values()))

  stack = metrics.StackFractions(num_classes)
  future = pred.array[0].read()
  for z in range(depth):
    data = future.result()
    if z + 1 < depth:
      future = pred.array[z + 1].read()  # read ahead while counting this slice
    stack.add(z, data)

  img = open_image(tru, pred, image)
  if tru.volume is not None:
    voxel = tru.volume.metadata.voxel_size_nm
  elif img is not None:
    voxel = img.metadata.voxel_size_nm
  else:
    voxel = pred.run.get("voxel_size_nm")
  voxel = tuple(float(v) for v in voxel) if voxel else None
  structure_result = None
  if structure and voxel:
    try:
      sized = quantify.size_classes(classes, size_classes)
    except ValueError as e:
      raise EvaluationError(f"--size_classes: {e}") from e
    structure_result = quantify.quantify_stack(
      pred.array, classes, voxel, max_voxels=max_voxels, sizes_for=sized
    )
  intervals = None
  if members:
    if structure_result is None:
      raise EvaluationError(
        "--members: intervals need the structure quantification (--structure, and a voxel "
        "size in the truth, image or prediction)"
      )
    opened = [open_prediction(m) for m in members]
    for m in opened:
      if tuple(m.shape) != tuple(pred.shape):
        raise EvaluationError(
          f"--members: {volume_lib.describe(m.path)} is {list(m.shape)} [z, y, x] but "
          f"--prediction {volume_lib.describe(pred.path)} is {list(pred.shape)}"
        )
    paths = [os.path.abspath(str(m.path)) for m in opened]
    quantified = [
      quantify.quantify_stack(m.array, classes, voxel, max_voxels=max_voxels, sizes_for=sized)
      for m in opened
    ]
    if os.path.abspath(str(pred.path)) not in paths:
      quantified.append(structure_result)
      paths.append(os.path.abspath(str(pred.path)))
    if len(quantified) < 2:
      raise EvaluationError("--members: give at least one segmentation besides --prediction")
    intervals = quantify.intervals(
      quantified, f"{len(quantified)} segmentations: " + ", ".join(paths)
    )
    intervals = _calibrate(intervals, tru, [*opened, pred], quantified, paths)
  return Report(
    prediction=pred,
    truth=tru,
    classes=tuple(classes),
    slices=tuple(slices),
    overall=overall,
    per_slice=per_slice,
    stack=stack,
    image=img,
    voxel_size_nm=voxel,
    structure=structure_result,
    intervals=intervals,
    numbering=numbering,
  )


def _calibrate(
  intervals: dict[str, Any],
  truth: Truth,
  opened: Sequence[Prediction],
  quantified: Sequence[quantify.Quantification],
  paths: Sequence[str],
) -> dict[str, Any]:
  """The members' ranges, with the volume fractions' calibrated on the held-out blocks
  of each member's training split where the truth volume and every split are known
  (`calibration`); else the ranges, with the reason in "calibration"."""
  if truth.volume is None:
    return {**intervals, "calibration": "not done: --truth is not a volume"}
  by_path = {os.path.abspath(str(m.path)): m for m in opened}
  members = [by_path[p] for p in paths]
  splits = [calibration.training_split(m.run) for m in members]
  lacking = [p for p, s in zip(paths, splits, strict=True) if s is None]
  if lacking:
    return {
      **intervals,
      "calibration": "not done: no single training checkpoint with its split for "
      + ", ".join(lacking),
    }
  numbering = truth.volume.metadata.numbering  # the splits name the user's slice numbers
  try:
    splits = [
      {**s, "eval_slices": numbering.to_zs(s["eval_slices"], "--config.data.eval_slices")}
      for s in splits
    ]
    blocks = [
      calibration.held_out_blocks(truth.volume, m.array, **split)
      for m, split in zip(members, splits, strict=True)
    ]
  except (ValueError, volume_lib.VolumeError) as e:  # LoaderError is a ValueError
    return {**intervals, "calibration": f"not done: {e}"}
  calibrated = calibration.calibrated_intervals(quantified, blocks, intervals["source"])
  return {**calibration.combine(intervals, calibrated), "calibration": calibrated["kind"]}


def _max_label(stack: ts.TensorStore | Sequence[np.ndarray]) -> int:
  """The largest label other than 255, slice by slice."""
  top = 0
  for z in range(len(stack) if isinstance(stack, list) else stack.shape[0]):
    data = stack[z] if isinstance(stack, list) else stack[z].read().result()
    valid = data[data != NOT_SEGMENTED]
    if valid.size:
      top = max(top, int(valid.max()))
  return top
