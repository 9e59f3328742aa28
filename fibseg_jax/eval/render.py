"""The files of an evaluation: report.json, report.md and the figures.

paths = write_report(report, "report/")   # report.json, report.md, slice_0020.png, ...
"""

from __future__ import annotations

import json
import os
from typing import Any

import numpy as np

from fibseg_jax import outputs
from fibseg_jax.data import palette
from fibseg_jax.data import volume as volume_lib
from fibseg_jax.eval import figures, quantify
from fibseg_jax.eval.inputs import EvaluationError
from fibseg_jax.eval.report import Report

REPORT_KIND = "report"  # the marker of a report directory (`fibseg_jax.outputs`)


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
  numbers = report.numbers  # file names and titles carry the user's slice numbers
  if figures_on:
    stack = figure_stack_name(report)
    for z, m in report.per_slice.items():
      path = os.path.join(out_dir, f"slice_{numbers.label(z):04d}.png")
      figures.slice_figure(
        path,
        z=numbers.label(z),
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
      z=numbers.labels(report.stack.z),
      fractions=report.stack.slice_fractions(),
      classes=report.classes,
      truth={numbers.label(z): m.truth_fractions for z, m in report.per_slice.items()},
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
    "slices": {str(numbers.label(z)): os.path.basename(p) for z, p in paths["slices"].items()},
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
  numbers = report.numbers
  z_list = numbers.text(report.slices)
  scope = report.stack_scope()
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
    f"predicted fraction, {scope} |",
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
    "Slices are numbered as the stack's files (as ingest read them). Truth and predicted "
    "fractions are over the annotated voxels of the evaluated slices; "
    + (
      f"the whole-stack fraction is over all {report.prediction.shape[0]} slices. "
      if report.whole_stack
      else f"the {scope} fraction is over the voxels segmented so far. "
    )
    + "n/a: undefined for this class: IoU and Dice when it occurs in neither truth nor "
    "prediction (left out of the means), precision when nothing was predicted as it, "
    "recall when the truth holds none of it.",
  ]
  quantities = report.phase_quantities()
  if quantities:
    lines += ["", "## Phase quantities", ""]
    for quantity, q in quantities.items():
      lines.append(
        f"- {quantity} ({q['class']}): truth {_fmt(q['truth'], True)}, predicted "
        f"{_fmt(q['predicted'], True)} on the evaluated voxels; "
        f"{_fmt(q['predicted_whole_stack'], True)} over the {scope}"
      )
  if report.stack.unlabelled:
    lines += [
      "",
      f"**{report.stack.unlabelled} voxels of the prediction are not segmented yet** "
      "(value 255); rerun `fibseg segment` to finish it.",
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
    "| slice | annotated voxels | accuracy | mean IoU | figure |",
    "| --- | --- | --- | --- | --- |",
  ]
  slice_paths = (paths or {}).get("slices", {})
  for z, m in report.per_slice.items():
    fig = os.path.basename(slice_paths[z]) if z in slice_paths else ""
    link = f"[{fig}]({fig})" if fig else ""
    lines.append(
      f"| {numbers.label(z)} | {m.voxels} | {_fmt(m.accuracy)} | {_fmt(m.mean_iou)} | {link} |"
    )
  if slice_paths or (paths or {}).get("fractions"):
    lines += ["", "## Figures", ""]
    for z, p in slice_paths.items():
      lines.append(
        f"![slice {numbers.label(z)}: channels | truth | prediction | error map]"
        f"({os.path.basename(p)})"
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
    f"Quantified on {q.subvolume.describe(q.voxel_size_nm, report.numbers)}, with the "
    "anisotropic voxel size "
    f"{voxel} nm [z, y, x] for every length, area and distance.",
    "",
    "| phase | volume fraction | largest cluster (share of phase) | clusters | "
    "percolates along | S_V (µm²/µm³) | surface / phase volume (1/µm) |",
    "| --- | --- | --- | --- | --- | --- | --- |",
  ]
  for p in q.phases:
    c = p.connectivity
    along = ", ".join(c.percolating_axes) or "none"
    if any(" percolation along " in text for text in p.caveats):
      along += " (see caveats)"
    lines.append(
      f"| {p.name} | {_fmt(p.volume_fraction, True)} | {_fmt(c.largest_fraction, True)} | "
      f"{c.clusters} | {along} | {_fmt(p.surface_density_per_um)} | "
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
      flag = " (see caveats)" if any(" sizes: " in text for text in p.caveats) else ""
      lines.append(
        f"| {p.name}{flag} | {_um(z.mean_nm)} | {_um(z.d10_nm)} | {_um(z.d50_nm)} | "
        f"{_um(z.d90_nm)} |"
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
  flagged = [c for p in q.phases for c in p.caveats]
  if flagged:
    lines += ["", "**Caveats** (the numbers above stand; read them with these):", ""]
    lines += [f"- {c}." for c in flagged]
  if q.not_segmented:
    lines.append(f"{q.not_segmented} voxels of the box are not segmented and count in no phase.")
  for key, alt in (("structure", "connectivity and surface density"), ("pore_sizes", "pore sizes")):
    if paths.get(key):
      lines += ["", f"![{alt}]({os.path.basename(paths[key])})"]
  return lines + _interval_lines(report)


_INTERVAL_NAMES = {
  "volume_fraction": ("volume fraction", True),
  "largest_cluster_fraction": ("largest cluster", True),
  "surface_density_per_um": ("S_V (µm²/µm³)", False),
  "d50_nm": ("pore d50 (nm)", False),
}


def _interval_lines(report: Report) -> list[str]:
  """The intervals section of report.md (empty without members)."""
  iv = report.intervals
  if not iv:
    return []
  lines = [
    "",
    f"### How much the numbers depend on the model ({iv['members']} segmentations)",
    "",
    f"Each quantity's range (min .. max) and mean +- std over {iv['source']}. A range "
    "wider than the difference you report means another annotated slice may change the "
    "number (`fibseg suggest` with the members' probabilities says which). The members "
    "share their biases, so a range alone often misses the truth; where the truth volume "
    "and the members' training splits are known, the volume fractions are corrected "
    "for the errors measured on the held-out validation blocks instead.",
    "",
    f"Calibration: {iv.get('calibration', 'not done')}.",
    "",
    "| phase | quantity | interval | mean +- std | interval kind |",
    "| --- | --- | --- | --- | --- |",
  ]
  calibrated = set(iv.get("calibrated", ()))
  for phase, entry in iv["phases"].items():
    for key, r in entry.items():
      name, percent = _INTERVAL_NAMES[key]
      kind = "calibrated" if key in calibrated else "members' range"
      lines.append(
        f"| {phase} | {name} | {_fmt(r['min'], percent)} .. {_fmt(r['max'], percent)} | "
        f"{_fmt(r['mean'], percent)} +- {_fmt(r['std'], percent)} | {kind} |"
      )
  return lines
