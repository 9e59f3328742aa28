"""Evaluation of a segmented stack against hand labels: report.json, report.md, figures.

  report = evaluate("seg.zarr", "vol.zarr", slices=[20])
  paths = write_report(report, "report/")

The prediction is a zarr v3 label array [z, y, x] uint8 as segment.py writes it (its
attributes name the classes and the source volume); any zarr v3 uint8 array works,
with class names taken from the truth. The truth is a volume (its labels on the chosen
slices, by default its annotated slices) or a glob of label images (TIFF/PNG, one per
slice, slice number = last integer in the file name, 255 = not annotated).

Scores are computed on the chosen slices; predicted phase fractions are also computed
over the whole stack, streaming slice by slice, with a profile along z. The predicted
microstructure is quantified per phase (connectivity, percolation, surface density, and
the pore-size distribution; see `fibseg_jax.eval.quantify`) on the whole stack when it
fits `max_voxels`, else on a centred subvolume, which the report names.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import tensorstore as ts

from fibseg_jax import outputs
from fibseg_jax.data import ingest, palette
from fibseg_jax.data import volume as volume_lib
from fibseg_jax.eval import figures, metrics, quantify

NOT_SEGMENTED = volume_lib.IGNORE_LABEL
REPORT_KIND = "report"  # the marker of a report directory (`fibseg_jax.outputs`)
# How a materials scientist names the fraction of a phase (matched in class names).
PHASE_QUANTITIES = (("pore", "porosity"), ("clinker", "unhydrated fraction"), ("unhydrated", ""))


class EvaluationError(ValueError):
  """Inputs of an evaluation that do not fit together; the message names the flag."""


@dataclasses.dataclass(frozen=True)
class Prediction:
  """An opened label array.

  Attributes:
    path: as given.
    array: tensorstore [z, y, x] uint8.
    classes: class names from the attributes, or () when it has none.
    source: the volume it was segmented from (attributes), or None.
    run: the run record segment.py stored, or {}.
  """

  path: Any
  array: ts.TensorStore
  classes: tuple[str, ...]
  source: str | None
  run: dict[str, Any]

  @property
  def shape(self) -> tuple[int, int, int]:
    return tuple(int(s) for s in self.array.shape)


def open_prediction(path: Any) -> Prediction:
  """Opens a label array written by segment.py (or any zarr v3 [z, y, x] uint8 array).

  Raises:
    EvaluationError: no array there, or not [z, y, x] uint8.
  """
  where = volume_lib.describe(path)
  local = volume_lib.local_path(path)
  if local is not None and not os.path.isdir(local):
    raise EvaluationError(f"--prediction={where}: no such array (run segment.py first)")
  kv = ts.KvStore.open(volume_lib.kvstore_spec(path), context=volume_lib.CONTEXT).result()
  raw = kv.read("zarr.json").result()
  if raw.state != "value":
    raise EvaluationError(f"--prediction={where}: not a zarr v3 array (no zarr.json)")
  meta = json.loads(raw.value)
  if meta.get("node_type") != "array":
    raise EvaluationError(
      f"--prediction={where} is a zarr {meta.get('node_type')}, not a label array; pass the "
      "--output of segment.py"
    )
  array = ts.open(
    {"driver": "zarr3", "kvstore": volume_lib.kvstore_spec(path)},
    open=True,
    context=volume_lib.CONTEXT,
  ).result()
  if array.rank != 3 or array.dtype.name != "uint8":
    raise EvaluationError(
      f"--prediction={where}: expected labels [z, y, x] uint8, got {array.dtype.name} "
      f"{list(array.shape)}"
    )
  attrs = meta.get("attributes", {})
  run = dict(attrs.get("fibseg_segmentation", {}).get("run", {}))
  return Prediction(
    path=path,
    array=array,
    classes=tuple(str(c) for c in attrs.get("classes", ())),
    source=run.get("source"),
    run=run,
  )


@dataclasses.dataclass(frozen=True)
class Truth:
  """Hand labels for some slices.

  Attributes:
    description: for messages and the report.
    shape: (z, y, x) of the labelled stack, z None for a glob.
    slices: slice indices that have labels.
    classes: class names, or () when unknown (a glob).
    read: z -> [y, x] uint8 labels, 255 = not annotated.
    volume: the volume when the truth is one (its images go into the figures).
  """

  description: str
  shape: tuple[int | None, int, int]
  slices: tuple[int, ...]
  classes: tuple[str, ...]
  read: Callable[[int], np.ndarray]
  volume: volume_lib.Volume | None = None


def _is_glob(spec: str) -> bool:
  return any(ch in spec for ch in "*?[") or spec.lower().endswith(ingest.IMAGE_EXTENSIONS)


def open_truth(spec: str | os.PathLike, slice_numbers: Sequence[int] | None = None) -> Truth:
  """Opens the truth: a volume root, or a glob of label images.

  Args:
    spec: volume root or glob.
    slice_numbers: for a glob, the instrument slice number of each z (ingest stores them
      in the volume as `slice_numbers`), so `labels_0001.tif` lands on the z that ingest
      gave image slice 1; default: the number in the file name is z.

  Raises:
    EvaluationError: naming --truth and what is wrong.
  """
  spec = os.fspath(spec)
  if _is_glob(spec):
    try:
      files = {f.number: f for f in ingest.find_slices(spec, "--truth")}
      first = files[min(files)].read(labels=True)
    except ingest.IngestError as e:
      raise EvaluationError(str(e)) from e
    if slice_numbers is not None:
      z_of = {int(n): z for z, n in enumerate(slice_numbers)}
      unknown = sorted(set(files) - set(z_of))
      if unknown:
        raise EvaluationError(
          f"--truth: {files[unknown[0]].describe()} has slice number {unknown[0]}, which no "
          f"image slice of the segmented volume has ({slice_numbers[0]}..{slice_numbers[-1]})"
        )
      files = {z_of[n]: f for n, f in files.items()}

    def read(z: int) -> np.ndarray:
      f = files[z]
      try:
        data = f.read(labels=True)
      except ingest.IngestError as e:
        raise EvaluationError(str(e)) from e
      if data.shape != first.shape:
        raise EvaluationError(
          f"--truth: {f.describe()} is {data.shape}, but {files[min(files)].describe()} is "
          f"{first.shape}"
        )
      if data.min() < 0 or data.max() > 255:
        raise EvaluationError(f"--truth: {f.describe()} holds values outside 0..255")
      return data.astype(np.uint8)

    return Truth(
      description=spec,
      shape=(None, *first.shape),
      slices=tuple(sorted(files)),
      classes=(),
      read=read,
    )
  try:
    vol = volume_lib.open_volume(spec, check_labels=False)
  except volume_lib.VolumeError as e:
    raise EvaluationError(
      f"--truth: {e} (or give a glob of label images, e.g. 'labels/*.tif')"
    ) from e
  return Truth(
    description=volume_lib.describe(spec),
    shape=vol.shape,
    slices=tuple(vol.metadata.annotated_slices),
    classes=vol.classes,
    read=lambda z: vol.read_labels(z),
    volume=vol,
  )


@dataclasses.dataclass
class Report:
  """Everything an evaluation found; `write_report` turns it into files.

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

  def to_json(self) -> dict[str, Any]:
    """The contents of report.json (NaN written as null)."""
    stack_fracs = self.stack.fractions()
    return {
      "prediction": volume_lib.describe(self.prediction.path),
      "truth": self.truth.description,
      "model": self.prediction.run.get("checkpoint"),
      "classes": list(self.classes),
      "slices": list(self.slices),
      "overall": self.overall.to_json(self.classes),
      "per_slice": {str(z): m.to_json(self.classes) for z, m in self.per_slice.items()},
      "stack": {
        "shape": list(self.prediction.shape),
        "voxel_size_nm": list(self.voxel_size_nm) if self.voxel_size_nm else None,
        "predicted_fractions": {n: _num(stack_fracs[i]) for i, n in enumerate(self.classes)},
        "not_segmented_voxels": int(self.stack.unlabelled),
        "per_slice_fractions": {
          str(z): [_num(v) for v in row]
          for z, row in zip(self.stack.z, self.stack.slice_fractions(), strict=True)
        },
      },
      "phase_quantities": self.phase_quantities(),
      "structure": self.structure.to_json() if self.structure else None,
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
  out: set[int] = set()
  for part in value.replace(" ", "").split(","):
    if not part:
      continue
    try:
      if "-" in part:
        lo, hi = (int(v) for v in part.split("-", 1))
        if hi < lo:
          raise ValueError
        out.update(range(lo, hi + 1))
      else:
        out.add(int(part))
    except ValueError:
      raise EvaluationError(
        f"{flag}={value}: expected slice numbers like 9, 9,40 or 0-10"
      ) from None
  return tuple(sorted(out))


def _resolve_classes(prediction: Prediction, truth: Truth) -> tuple[str, ...]:
  if prediction.classes and truth.classes and prediction.classes != truth.classes:
    raise EvaluationError(
      f"--prediction has classes {list(prediction.classes)} but --truth "
      f"{truth.description} has {list(truth.classes)}; they must name the same phases in "
      "the same order"
    )
  return prediction.classes or truth.classes


def _image_volume(
  truth: Truth, prediction: Prediction, image: Any | None
) -> volume_lib.Volume | None:
  if image is not None:
    try:
      vol = volume_lib.open_volume(image, check_labels=False)
    except volume_lib.VolumeError as e:
      raise EvaluationError(f"--image: {e}") from e
    if vol.shape != prediction.shape:
      raise EvaluationError(
        f"--image {volume_lib.describe(image)} is {list(vol.shape)} [z, y, x] but "
        f"--prediction is {list(prediction.shape)}"
      )
    return vol
  if truth.volume is not None:
    return truth.volume
  if prediction.source:
    try:
      vol = volume_lib.open_volume(prediction.source, check_labels=False)
    except volume_lib.VolumeError:
      return None  # moved or deleted: the figures then show labels only
    return vol if vol.shape == prediction.shape else None
  return None


def _slice_numbers(truth: Any, prediction: Prediction) -> list[int] | None:
  """The instrument slice numbers of the prediction's source volume, for a label glob."""
  if not _is_glob(os.fspath(truth)) or not prediction.source:
    return None
  try:
    numbers = volume_lib.group_attributes(prediction.source).get("slice_numbers")
  except volume_lib.VolumeError:
    return None  # moved or deleted: fall back to file number = z
  return [int(n) for n in numbers] if numbers else None


def evaluate(
  prediction: Any,
  truth: Any,
  slices: Sequence[int] | str | None = None,
  *,
  image: Any | None = None,
  structure: bool = True,
  max_voxels: int = quantify.DEFAULT_MAX_VOXELS,
  size_classes: Sequence[str] | None = None,
) -> Report:
  """Scores a segmented stack against hand labels and measures its phase fractions.

  Args:
    prediction: the label array [z, y, x] uint8 (segment.py --output), or a `Prediction`.
    truth: a volume root or a glob of label images (see `open_truth`), or a `Truth`.
    slices: slices to score; default every slice the truth labels.
    image: volume whose channels the figures show; default the truth volume, else the
      prediction's source volume.
    structure: quantify the predicted microstructure (`quantify.quantify_stack`).
    max_voxels: the largest subvolume quantified, in voxels.
    size_classes: classes that get a pore-size distribution; default those named like
      pores ("pore", "void").

  Returns:
    A `Report`.

  Raises:
    EvaluationError: shapes differ, a slice is out of range or has no labels, the
      classes disagree, or the prediction is unfinished on an evaluated slice.
  """
  pred = prediction if isinstance(prediction, Prediction) else open_prediction(prediction)
  tru = truth if isinstance(truth, Truth) else open_truth(truth, _slice_numbers(truth, pred))
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
  slices = parse_slices(slices) if isinstance(slices, str) or slices is None else slices
  slices = tuple(sorted(set(int(z) for z in slices))) or tru.slices
  if not slices:
    raise EvaluationError(f"--truth {tru.description} has no annotated slices; nothing to score")
  bad = [z for z in slices if not 0 <= z < depth]
  if bad:
    raise EvaluationError(f"--slices: {bad} out of range; the stack has slices 0..{depth - 1}")
  missing = [z for z in slices if z not in tru.slices]
  if missing:
    raise EvaluationError(
      f"--slices: {missing} have no labels in --truth {tru.description} (labelled: "
      f"{list(tru.slices)})"
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
    if not annotated.any():
      raise EvaluationError(f"--slices: slice {z} of --truth {tru.description} has no labels")
    unfinished = int(np.count_nonzero(p[annotated] == NOT_SEGMENTED))
    if unfinished:
      raise EvaluationError(
        f"--prediction {volume_lib.describe(pred.path)}: slice {z} has {unfinished} "
        "annotated voxels that are not segmented yet; rerun segment.py to finish it"
      )
    try:
      per_slice[z] = metrics.segmentation_metrics(t, p, num_classes)
    except metrics.MetricsError as e:
      raise EvaluationError(f"slice {z}: {e}") from e
  overall = metrics.metrics_from_confusion(sum(m.confusion for m in per_slice.values()))

  stack = metrics.StackFractions(num_classes)
  future = pred.array[0].read()
  for z in range(depth):
    data = future.result()
    if z + 1 < depth:
      future = pred.array[z + 1].read()  # read ahead while counting this slice
    stack.add(z, data)

  img = _image_volume(tru, pred, image)
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
  )


def _max_label(stack: ts.TensorStore | Sequence[np.ndarray]) -> int:
  """The largest label other than 255, slice by slice."""
  top = 0
  for z in range(len(stack) if isinstance(stack, list) else stack.shape[0]):
    data = stack[z] if isinstance(stack, list) else stack[z].read().result()
    valid = data[data != NOT_SEGMENTED]
    if valid.size:
      top = max(top, int(valid.max()))
  return top


def _fmt(value: float | None, percent: bool = False) -> str:
  if value is None or np.isnan(value):
    return "n/a"
  return f"{100 * value:.2f} %" if percent else f"{value:.4f}"


def _slice_images(report: Report, z: int) -> dict[str, np.ndarray]:
  vol = report.image
  if vol is None:
    return {}
  names = vol.channels[:3]
  offset, scale = vol.normalization(names)
  data = vol.read_image(z).astype(np.float32)[..., : len(names)]
  norm = np.clip((data - offset) * scale, -1, 1)
  return {name: norm[..., i] for i, name in enumerate(names)}


def figure_stack_name(report: Report) -> str:
  """The stack named in the figures' titles: the image volume shown, else the volume the
  prediction was segmented from, else the prediction."""
  if report.image is not None:
    return palette.stack_name(report.image.root)
  return palette.stack_name(report.prediction.source or report.prediction.path)


def write_report(report: Report, out_dir: str | os.PathLike, *, figures_on: bool = True):
  """Writes report.json, report.md, one PNG per evaluated slice and the z profile.

  Args:
    report: from `evaluate`.
    out_dir: directory, created if missing.
    figures_on: also draw the figures.

  Returns:
    dict with the paths written: "json", "markdown", "slices" (z -> PNG), "fractions",
    "structure" and "pore_sizes" (None when not drawn).
  """
  out_dir = os.fspath(out_dir)
  inputs = {"--prediction": report.prediction.path, "--truth": report.truth.description}
  if report.image is not None:
    inputs["--image"] = report.image.root
  try:
    outputs.claim(out_dir, kind=REPORT_KIND, flag="--out", inputs=inputs, directory=True)
  except outputs.OutputError as e:
    raise EvaluationError(str(e)) from e
  paths: dict[str, Any] = {
    "json": os.path.join(out_dir, "report.json"),
    "markdown": os.path.join(out_dir, "report.md"),
    "slices": {},
    "fractions": None,
    "structure": None,
    "pore_sizes": None,
  }
  if figures_on:
    stack = figure_stack_name(report)
    for z, m in report.per_slice.items():
      path = os.path.join(out_dir, f"slice_{z:04d}.png")
      figures.slice_figure(
        path,
        z=z,
        images=_slice_images(report, z),
        truth=report.truth.read(z),
        prediction=report.prediction.array[z].read().result(),
        classes=report.classes,
        title=f"accuracy {_fmt(m.accuracy)}, mean IoU {_fmt(m.mean_iou)}",
        stack=stack,
        voxel_size_nm=report.voxel_size_nm,
      )
      paths["slices"][z] = path
    paths["fractions"] = os.path.join(out_dir, "fractions_z.png")
    figures.fractions_figure(
      paths["fractions"],
      z=report.stack.z,
      fractions=report.stack.slice_fractions(),
      classes=report.classes,
      truth={z: m.truth_fractions for z, m in report.per_slice.items()},
      voxel_size_nm=report.voxel_size_nm,
      stack=stack,
    )
    if report.structure is not None:
      paths["structure"] = os.path.join(out_dir, "structure.png")
      figures.structure_figure(paths["structure"], structure=report.structure, stack=stack)
      if any(p.sizes is not None for p in report.structure.phases):
        paths["pore_sizes"] = os.path.join(out_dir, "pore_sizes.png")
        figures.pore_size_figure(paths["pore_sizes"], structure=report.structure, stack=stack)
  doc = report.to_json()
  doc["figures"] = {
    "slices": {str(z): os.path.basename(p) for z, p in paths["slices"].items()},
    **{
      key: os.path.basename(paths[key]) if paths[key] else None
      for key in ("fractions", "structure", "pore_sizes")
    },
  }
  outputs.write_text(paths["json"], json.dumps(doc, indent=1, allow_nan=False))
  outputs.write_text(paths["markdown"], markdown(report, paths))
  return paths


def markdown(report: Report, paths: dict[str, Any] | None = None) -> str:
  """report.md: summary, per-class scores, phase fractions, confusion matrix, figures."""
  o, classes = report.overall, report.classes
  stack_fracs = report.stack.fractions()
  z_list = ", ".join(str(z) for z in report.slices)
  lines = [
    "# Segmentation report",
    "",
    f"- prediction: `{volume_lib.describe(report.prediction.path)}` "
    f"({' x '.join(str(s) for s in report.prediction.shape)} voxels [z, y, x])",
    f"- model: `{report.prediction.run.get('checkpoint') or 'unknown'}`",
    f"- truth: `{report.truth.description}`, slice(s) {z_list}",
  ]
  if report.voxel_size_nm:
    lines.append(f"- voxel size: {' x '.join(f'{v:g}' for v in report.voxel_size_nm)} nm [z, y, x]")
  lines += [
    "",
    "| score (evaluated slices) | value |",
    "| --- | --- |",
    f"| accuracy | {_fmt(o.accuracy)} |",
    f"| mean IoU | {_fmt(o.mean_iou)} |",
    f"| mean Dice | {_fmt(o.mean_dice)} |",
    f"| annotated voxels | {o.voxels} |",
    "",
    "## Per class",
    "",
    "| class | IoU | Dice | precision | recall | truth fraction | predicted fraction | "
    "predicted fraction, whole stack |",
    "| --- | --- | --- | --- | --- | --- | --- | --- |",
  ]
  for i, name in enumerate(classes):
    lines.append(
      f"| {name} | {_fmt(o.iou[i])} | {_fmt(o.dice[i])} | {_fmt(o.precision[i])} | "
      f"{_fmt(o.recall[i])} | {_fmt(o.truth_fractions[i], True)} | "
      f"{_fmt(o.predicted_fractions[i], True)} | {_fmt(stack_fracs[i], True)} |"
    )
  lines += [
    "",
    "Truth and predicted fractions are over the annotated voxels of the evaluated slices; "
    f"the whole-stack fraction is over all {report.prediction.shape[0]} slices. "
    "n/a: the class occurs in neither truth nor prediction (left out of the means).",
  ]
  quantities = report.phase_quantities()
  if quantities:
    lines += ["", "## Phase quantities", ""]
    for quantity, q in quantities.items():
      lines.append(
        f"- {quantity} ({q['class']}): truth {_fmt(q['truth'], True)}, predicted "
        f"{_fmt(q['predicted'], True)} on the evaluated voxels; "
        f"{_fmt(q['predicted_whole_stack'], True)} over the whole stack"
      )
  if report.stack.unlabelled:
    lines += [
      "",
      f"**{report.stack.unlabelled} voxels of the prediction are not segmented yet** "
      "(value 255); rerun segment.py to finish it.",
    ]
  lines += _structure_lines(report, paths or {})
  lines += [
    "",
    "## Confusion matrix (rows truth, columns prediction, voxels)",
    "",
    "| truth \\ predicted | " + " | ".join(classes) + " |",
    "| --- |" + " --- |" * len(classes),
  ]
  for i, name in enumerate(classes):
    lines.append(f"| {name} | " + " | ".join(str(int(v)) for v in o.confusion[i]) + " |")
  lines += [
    "",
    "## Per slice",
    "",
    "| z | annotated voxels | accuracy | mean IoU | figure |",
    "| --- | --- | --- | --- | --- |",
  ]
  slice_paths = (paths or {}).get("slices", {})
  for z, m in report.per_slice.items():
    fig = os.path.basename(slice_paths[z]) if z in slice_paths else ""
    link = f"[{fig}]({fig})" if fig else ""
    lines.append(f"| {z} | {m.voxels} | {_fmt(m.accuracy)} | {_fmt(m.mean_iou)} | {link} |")
  if slice_paths or (paths or {}).get("fractions"):
    lines += ["", "## Figures", ""]
    for z, p in slice_paths.items():
      lines.append(
        f"![slice {z}: channels | truth | prediction | error map]({os.path.basename(p)})"
      )
    if paths.get("fractions"):
      lines += ["", f"![phase fractions along z]({os.path.basename(paths['fractions'])})"]
  return "\n".join(lines) + "\n"


def _um(value_nm: float) -> str:
  return f"{value_nm / 1000:.3g} µm"


def _structure_lines(report: Report, paths: dict[str, Any]) -> list[str]:
  """The microstructure section of report.md (empty without a quantification)."""
  q = report.structure
  if q is None:
    return []
  voxel = " x ".join(f"{v:g}" for v in q.voxel_size_nm)
  lines = [
    "",
    "## Microstructure of the prediction",
    "",
    f"Quantified on {q.subvolume.describe(q.voxel_size_nm)}, with the anisotropic voxel size "
    f"{voxel} nm [z, y, x] for every length, area and distance.",
    "",
    "| phase | volume fraction | largest cluster (share of phase) | clusters | "
    "percolates along | S_V (µm²/µm³) | surface / phase volume (1/µm) |",
    "| --- | --- | --- | --- | --- | --- | --- |",
  ]
  for p in q.phases:
    c = p.connectivity
    along = ", ".join(c.percolating_axes)
    lines.append(
      f"| {p.name} | {_fmt(p.volume_fraction, True)} | {_fmt(c.largest_fraction, True)} | "
      f"{c.clusters} | {along or 'none'} | {_fmt(p.surface_density_per_um)} | "
      f"{_fmt(p.surface_per_phase_volume_per_um)} |"
    )
  sized = [p for p in q.phases if p.sizes is not None]
  if sized:
    lines += [
      "",
      "Pore sizes (local thickness: diameter of the largest ball inside the phase that "
      "holds the voxel; volume-weighted):",
      "",
      "| phase | mean | d10 | d50 | d90 |",
      "| --- | --- | --- | --- | --- |",
    ]
    for p in sized:
      z = p.sizes
      lines.append(
        f"| {p.name} | {_um(z.mean_nm)} | {_um(z.d10_nm)} | {_um(z.d50_nm)} | {_um(z.d90_nm)} |"
      )
  lines += [
    "",
    "Clusters are 6-connected (voxels sharing a face); a phase percolates along an axis "
    "when one cluster touches both faces of the quantified box across it. Surface: "
    f"marching cubes at the voxel spacing with {quantify.TAUBIN_STEPS} Taubin smoothing "
    "steps (a sphere within ~2.5%, flat faces short by about one voxel per edge); S_V "
    "is interface area per volume of the box. Local thickness from anisotropic distance "
    "transforms, within half a voxel for round pores, one voxel over for flat ones.",
  ]
  if q.not_segmented:
    lines.append(f"{q.not_segmented} voxels of the box are not segmented and count in no phase.")
  for key, alt in (("structure", "connectivity and surface density"), ("pore_sizes", "pore sizes")):
    if paths.get(key):
      lines += ["", f"![{alt}]({os.path.basename(paths[key])})"]
  return lines
