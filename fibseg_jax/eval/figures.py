"""Figures of an evaluation: per-slice panels, the phase-fraction profile along z, the
phases' connectivity and surface density, and the pore-size distribution.

Class colours follow the class name (`fibseg_jax.data.palette`, also in the OME-Zarr
and TIFF exports and the training curves): pore near black, C-S-H grey-green,
portlandite blue, clinker orange whatever their index. Image panels carry a scale bar
from the voxel size, titles name the stack, and lengths are written in nm or µm, never
in powers of ten. Figures are drawn on their own `Figure` objects (no pyplot), so no
display is needed and importing this module leaves the caller's matplotlib backend alone.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence

import numpy as np
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch
from matplotlib.ticker import (
  FixedLocator,
  FuncFormatter,
  LogLocator,
  NullFormatter,
)

from fibseg_jax.data import palette
from fibseg_jax.data import volume as volume_lib
from fibseg_jax.eval import quantify

NOT_ANNOTATED_COLOR = palette.NOT_ANNOTATED_COLOR
CORRECT_COLOR = palette.CORRECT_COLOR
ERROR_COLOR = palette.ERROR_COLOR
# Panels are shown at most this many pixels on a side (nearest-neighbour subsampling).
MAX_DISPLAY_PX = 1024
# At most this many labelled ticks on the pore-size (log) axis.
MAX_SIZE_TICKS = 7


def class_colors(classes: Sequence[str] | int) -> np.ndarray:
  """RGB colours [n, 3] in [0, 1] of the classes, by name (`palette.class_colors`)."""
  return palette.class_colors(classes)


def colorize(labels: np.ndarray, colors: np.ndarray, ignore: int = volume_lib.IGNORE_LABEL):
  """[y, x] labels -> [y, x, 3] RGB; `ignore` (and any value without a colour) is white."""
  table = np.tile(np.asarray(NOT_ANNOTATED_COLOR), (256, 1))
  table[: len(colors)] = colors
  return table[np.clip(labels, 0, 255).astype(np.intp)]


def error_map(truth: np.ndarray, prediction: np.ndarray, ignore: int = volume_lib.IGNORE_LABEL):
  """[y, x, 3] RGB: grey where right, red where wrong, white where not annotated."""
  rgb = np.empty((*truth.shape, 3))
  rgb[:] = CORRECT_COLOR
  rgb[(truth != prediction) & (truth != ignore)] = ERROR_COLOR
  rgb[truth == ignore] = NOT_ANNOTATED_COLOR
  return rgb


def _stride(shape: Sequence[int]) -> int:
  return max(1, math.ceil(max(shape) / MAX_DISPLAY_PX))


def _title(*parts: str) -> str:
  return ": ".join(p for p in parts if p)


def slice_figure(
  path: str | os.PathLike,
  *,
  z: int,
  images: Mapping[str, np.ndarray],
  truth: np.ndarray,
  prediction: np.ndarray,
  classes: Sequence[str],
  title: str = "",
  stack: str = "",
  voxel_size_nm: Sequence[float] | None = None,
) -> None:
  """Writes one PNG: each image channel | truth | prediction | error map, with a legend,
  a scale bar (when the voxel size is known) and a title naming the stack and slice.

  Args:
    path: the PNG to write.
    z: slice index, for the title.
    images: channel name -> [y, x] float image normalised to about [-1, 1] (e.g.
      ICE and TLD); may be empty when no image is available.
    truth: [y, x] uint8 labels, 255 = not annotated.
    prediction: [y, x] uint8 labels.
    classes: class names; label i is classes[i].
    title: what follows the slice in the title (e.g. the scores of the slice).
    stack: the stack's name (e.g. `palette.stack_name` of its path).
    voxel_size_nm: (z, y, x) in nm; gives the scale bar and the y-x aspect.
  """
  s = _stride(truth.shape)
  colors = class_colors(classes)
  panels = [(name, img[::s, ::s], "gray") for name, img in images.items()]
  panels += [
    ("truth", colorize(truth[::s, ::s], colors), None),
    ("prediction", colorize(prediction[::s, ::s], colors), None),
    ("error map", error_map(truth[::s, ::s], prediction[::s, ::s]), None),
  ]
  aspect = 1.0
  if voxel_size_nm is not None:
    aspect = float(voxel_size_nm[1]) / float(voxel_size_nm[2])
  height = truth.shape[0] * aspect / truth.shape[1]
  fig = Figure(figsize=(3.2 * len(panels), 3.2 * height + 1.3))
  axes = fig.subplots(1, len(panels), squeeze=False)[0]
  for ax, (name, data, cmap) in zip(axes, panels, strict=True):
    if cmap:
      ax.imshow(data, cmap=cmap, vmin=-1, vmax=1, interpolation="nearest", aspect=aspect)
    else:
      ax.imshow(data, interpolation="nearest", aspect=aspect)
    ax.set_title(name, fontsize=10)
    ax.set_xticks([])
    ax.set_yticks([])
  if voxel_size_nm is not None:
    shown = panels[0][1].shape[1]
    palette.add_scale_bar(axes[0], float(voxel_size_nm[2]) * s, shown)
  handles = [Patch(facecolor=colors[i], edgecolor="k", label=n) for i, n in enumerate(classes)]
  handles += [
    Patch(facecolor=NOT_ANNOTATED_COLOR, edgecolor="k", label="not annotated"),
    Patch(facecolor=CORRECT_COLOR, edgecolor="k", label="correct"),
    Patch(facecolor=ERROR_COLOR, edgecolor="k", label="error"),
  ]
  rows = math.ceil(len(handles) / max(4, 2 * len(panels)))
  ncol = math.ceil(len(handles) / rows)
  fig.legend(handles=handles, loc="lower center", ncol=ncol, fontsize=9, frameon=False)
  fig.suptitle(_title(", ".join(p for p in (stack, f"slice {z}") if p), title), fontsize=11)
  fig.tight_layout(rect=(0, 0.06 + 0.05 * rows, 1, 0.95))
  fig.savefig(path, dpi=120)


def fractions_figure(
  path: str | os.PathLike,
  *,
  z: Sequence[int],
  fractions: np.ndarray,
  classes: Sequence[str],
  truth: Mapping[int, np.ndarray] | None = None,
  voxel_size_nm: Sequence[float] | None = None,
  stack: str = "",
) -> None:
  """Writes the phase-fraction profile along z (e.g. porosity per slice) as a PNG.

  Args:
    path: the PNG to write.
    z: [n] slice numbers (the user's, `volume.SliceNumbers`).
    fractions: [n, C] predicted fraction of each class on each slice.
    classes: class names.
    truth: optional z -> [C] truth fractions (on the annotated voxels), drawn as markers.
    voxel_size_nm: (z, y, x); adds the depth in micrometres on a top axis.
    stack: the stack's name, for the title.
  """
  colors = class_colors(classes)
  fig = Figure(figsize=(7, 3.8))
  ax = fig.subplots()
  z = np.asarray(z)
  handles = []
  for i, name in enumerate(classes):
    (line,) = ax.plot(z, 100 * fractions[:, i], color=colors[i], lw=1.6, label=name)
    handles.append(line)
    if truth:
      tz = sorted(truth)
      ax.plot(tz, [100 * truth[k][i] for k in tz], "o", color=colors[i], mec="k", ms=6)
  if truth:
    handles.append(
      Line2D([], [], ls="", marker="o", color="w", mec="k", ms=6, label="truth (annotated)")
    )
  top = float(np.nanmax(fractions)) * 100 if fractions.size else 100.0
  if truth:
    top = max(top, 100 * max(float(np.nanmax(v)) for v in truth.values()))
  ax.set_ylim(0, min(100.0, 1.15 * top + 2))
  ax.set_xlabel("slice number")
  ax.set_ylabel("volume fraction (%)")
  ax.xaxis.get_major_locator().set_params(integer=True)
  ax.grid(alpha=0.3)
  fig.suptitle(_title("predicted phase fractions along z", stack), fontsize=10)
  if voxel_size_nm and len(z):
    dz = float(voxel_size_nm[0]) / 1000.0
    depth = ax.secondary_xaxis("top", functions=(lambda v: v * dz, lambda v: v / dz))
    depth.set_xlabel("depth (µm)")
    depth.xaxis.set_major_formatter(FuncFormatter(lambda v, _: palette.plain_number(v)))
  ax.legend(handles=handles, fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5))
  fig.tight_layout()
  fig.savefig(path, dpi=120)


def _voxel_text(voxel_size_nm: Sequence[float]) -> str:
  return " x ".join(f"{v:g}" for v in voxel_size_nm) + " nm [z, y, x]"


def _name_ticks(ax, x: np.ndarray, names: Sequence[str]) -> None:
  """Class names under bars, slanted when they would not fit side by side."""
  crowded = len(names) > 5 or sum(len(n) for n in names) > 40
  if crowded:
    ax.set_xticks(x, names, rotation=30, ha="right", rotation_mode="anchor")
  else:
    ax.set_xticks(x, names)


def _percolation_caveat(phase: quantify.PhaseStructure) -> bool:
  return any(" percolation along " in c for c in phase.caveats)


def structure_figure(
  path: str | os.PathLike, *, structure: quantify.Quantification, stack: str = ""
) -> None:
  """Writes per-phase bars: volume fraction and largest-cluster share (with the axes
  along which the phase percolates, starred where the box is too thin for it to say
  much: `quantify.caveats`), and surface density S_V.

  Args:
    path: the PNG to write.
    structure: from `quantify.quantify_stack`.
    stack: the stack's name, for the title.
  """
  phases = structure.phases
  names = [p.name for p in phases]
  colors = class_colors(names)
  x = np.arange(len(phases))
  fig = Figure(figsize=(max(10, 1.4 * len(phases) + 4), 4.4))
  left, right = fig.subplots(1, 2)
  fractions = [100 * p.volume_fraction for p in phases]
  largest = [100 * np.nan_to_num(p.connectivity.largest_fraction) for p in phases]
  left.bar(x - 0.2, fractions, 0.4, color=colors, edgecolor="k", label="volume fraction")
  left.bar(
    x + 0.2, largest, 0.4, color=colors, edgecolor="k", hatch="//", alpha=0.6,
    label="largest connected cluster (share of the phase)",
  )  # fmt: skip
  many = len(phases) > 5  # then only the axes' letters fit above the bars
  for i, p in enumerate(phases):
    axes = " ".join(p.connectivity.percolating_axes)
    if many:
      text = axes or "none"
    else:
      text = f"percolates {axes}" if axes else "no percolation"
    if _percolation_caveat(p):
      text += "*"
    left.annotate(
      text, (x[i], max(fractions[i], largest[i])), xytext=(0, 4), textcoords="offset points",
      ha="center", va="bottom", fontsize=7 if many else 8,
    )  # fmt: skip
  _name_ticks(left, x, names)
  left.set_ylim(0, 118)
  left.set_yticks(range(0, 101, 20))
  left.set_ylabel("%")
  left.set_title(
    "volume fraction and connectivity (6-connected)"
    + ("\nabove the bars: axes along which the phase percolates" if many else ""),
    fontsize=10,
  )
  left.grid(axis="y", alpha=0.3)
  if any(_percolation_caveat(p) for p in phases):
    fig.text(
      0.01, 0.01, f"* percolation across a box under {quantify.FEW_TIMES:g}x the phase's "
      "feature size along that axis says little: see the report's caveats",
      fontsize=8, ha="left", va="bottom",
    )  # fmt: skip
  density = [np.nan_to_num(p.surface_density_per_um) for p in phases]
  right.bar(x, density, 0.6, color=colors, edgecolor="k")
  _name_ticks(right, x, names)
  right.set_ylabel("surface density S_V (µm² / µm³)")
  right.set_title("interface area per volume", fontsize=10)
  right.grid(axis="y", alpha=0.3)
  where = (
    f"{structure.subvolume.describe(structure.voxel_size_nm)}; voxel "
    f"{_voxel_text(structure.voxel_size_nm)}"
  )
  fig.suptitle(f"phase structure of {stack}\n{where}" if stack else where, fontsize=9)
  handles, labels = left.get_legend_handles_labels()
  fig.legend(handles, labels, loc="lower left", ncol=2, fontsize=8, frameon=False)
  fig.tight_layout(rect=(0, 0.07, 1, 0.92))
  fig.savefig(path, dpi=120)


def length_unit(largest_nm: float) -> tuple[str, float]:
  """(unit, nm per unit) for an axis of lengths up to `largest_nm`: nm up to 2 µm, then
  µm, so tick labels stay short plain numbers."""
  return ("µm", 1000.0) if largest_nm > 2000 else ("nm", 1.0)


def pore_size_figure(
  path: str | os.PathLike, *, structure: quantify.Quantification, stack: str = ""
) -> None:
  """Writes the volume-weighted size (local thickness) distribution of each phase that
  has one: the share of the phase's volume at each diameter (bars, log-spaced bins)
  and below it (cumulative line), with d10, d50 and d90 marked. Diameters are in nm or
  µm by their range, with plain tick labels.

  Args:
    path: the PNG to write.
    structure: from `quantify.quantify_stack`, with sizes for at least one phase.
    stack: the stack's name, for the title.
  """
  sized = [p for p in structure.phases if p.sizes is not None]
  colors = {p.name: palette.class_color(p.name) for p in sized}
  largest = max((float(np.max(p.sizes.diameters_nm)) for p in sized), default=1000.0)
  unit, per_unit = length_unit(largest)
  fig = Figure(figsize=(7.5, 4.4))
  ax = fig.subplots()
  cum_ax = ax.twinx()
  lows, highs, marked = [], [], []
  for p in sized:
    d, f = p.sizes.diameters_nm / per_unit, p.sizes.volume_fractions
    lo, hi = max(d.min(), 1e-3 / per_unit), max(d.max(), d.min() * 1.01)
    edges = np.geomspace(lo / 1.05, hi * 1.05, min(30, len(d) + 1))
    lows.append(edges[0])
    highs.append(edges[-1])
    hist, _ = np.histogram(d, bins=edges, weights=f)
    color = colors[p.name]
    quantiles = (("d10", p.sizes.d10_nm), ("d50", p.sizes.d50_nm), ("d90", p.sizes.d90_nm))
    values = " / ".join(palette.plain_number(v / per_unit, digits=3) for _, v in quantiles)
    ax.bar(
      edges[:-1], 100 * hist, np.diff(edges), align="edge", color=color, alpha=0.45,
      edgecolor="k", linewidth=0.4,
      label=f"{p.name}: d10 / d50 / d90 = {values} {unit}",
    )  # fmt: skip
    cum_ax.step(d, 100 * np.cumsum(f), where="post", color=color, lw=1.8)
    for q, value in quantiles:
      x = value / per_unit
      cum_ax.axvline(x, color=color, ls="--" if q == "d50" else ":", lw=1)
      if any(abs(math.log(x / m)) < 0.03 for m in marked):
        continue  # another phase's mark is there already
      marked.append(x)
      cum_ax.annotate(
        q, (x, 99), ha="right", va="top", rotation=90, fontsize=7,
        xytext=(-1, 0), textcoords="offset points",
      )  # fmt: skip
  ax.set_xscale("log")
  if sized:
    lo, hi = min(lows), max(highs)
    ax.set_xlim(lo, hi)
    ax.xaxis.set_major_locator(FixedLocator(palette.log_ticks(lo, hi, MAX_SIZE_TICKS)))
  ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: palette.plain_number(v)))
  ax.xaxis.set_minor_locator(LogLocator(subs="all"))
  ax.xaxis.set_minor_formatter(NullFormatter())
  ax.set_xlabel(f"local thickness (diameter, {unit})")
  ax.set_ylabel("volume share per bin (%)")
  cum_ax.set_ylabel("cumulative volume (%)")
  cum_ax.set_ylim(0, 105)
  ax.grid(alpha=0.3, which="major")
  ax.grid(alpha=0.12, which="minor")
  if sized:  # below the axes, clear of the bars and the d10 / d50 / d90 marks
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.16), frameon=False)
  what = f"pore-size distribution of {stack}" if stack else "pore-size distribution"
  ax.set_title(f"{what}\nvoxel {_voxel_text(structure.voxel_size_nm)}", fontsize=9)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
