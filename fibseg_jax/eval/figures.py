"""Figures of an evaluation: per-slice panels, the phase-fraction profile along z, the
phases' connectivity and surface density, and the pore-size distribution.

Class colours are the same everywhere (`class_colors`, also in the OME-Zarr and TIFF
exports): the synthetic phantom's palette first (pore near black, C-S-H grey-green,
portlandite blue, clinker orange), then matplotlib's tab10. Figures are drawn on their
own `Figure` objects (no pyplot), so no display is needed and importing this module
leaves the caller's matplotlib backend alone.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence

import numpy as np
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch

from fibseg_jax.data import ome
from fibseg_jax.data import volume as volume_lib
from fibseg_jax.eval import quantify

NOT_ANNOTATED_COLOR = (1.0, 1.0, 1.0)
CORRECT_COLOR = (0.78, 0.78, 0.78)
ERROR_COLOR = (0.86, 0.08, 0.10)
# Panels are shown at most this many pixels on a side (nearest-neighbour subsampling).
MAX_DISPLAY_PX = 1024


def class_colors(n: int) -> np.ndarray:
  """RGB colours [n, 3] in [0, 1] for class indices 0..n-1, the same in every figure."""
  return ome.class_colors(n)


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


def slice_figure(
  path: str | os.PathLike,
  *,
  z: int,
  images: Mapping[str, np.ndarray],
  truth: np.ndarray,
  prediction: np.ndarray,
  classes: Sequence[str],
  title: str = "",
) -> None:
  """Writes one PNG: each image channel | truth | prediction | error map, with a legend.

  Args:
    path: the PNG to write.
    z: slice index, for the panel titles.
    images: channel name -> [y, x] float image normalised to about [-1, 1] (e.g.
      ICE and TLD); may be empty when no image is available.
    truth: [y, x] uint8 labels, 255 = not annotated.
    prediction: [y, x] uint8 labels.
    classes: class names; label i is classes[i].
    title: figure title (e.g. the scores of the slice).
  """
  s = _stride(truth.shape)
  colors = class_colors(len(classes))
  panels = [(f"{name} (z={z})", img[::s, ::s], "gray") for name, img in images.items()]
  panels += [
    ("truth", colorize(truth[::s, ::s], colors), None),
    ("prediction", colorize(prediction[::s, ::s], colors), None),
    ("error map", error_map(truth[::s, ::s], prediction[::s, ::s]), None),
  ]
  aspect = truth.shape[0] / truth.shape[1]
  fig = Figure(figsize=(3.2 * len(panels), 3.2 * aspect + 1.1))
  axes = fig.subplots(1, len(panels), squeeze=False)
  for ax, (name, data, cmap) in zip(axes[0], panels, strict=True):
    if cmap:
      ax.imshow(data, cmap=cmap, vmin=-1, vmax=1, interpolation="nearest")
    else:
      ax.imshow(data, interpolation="nearest")
    ax.set_title(name, fontsize=10)
    ax.set_xticks([])
    ax.set_yticks([])
  handles = [Patch(facecolor=colors[i], edgecolor="k", label=n) for i, n in enumerate(classes)]
  handles += [
    Patch(facecolor=NOT_ANNOTATED_COLOR, edgecolor="k", label="not annotated"),
    Patch(facecolor=CORRECT_COLOR, edgecolor="k", label="correct"),
    Patch(facecolor=ERROR_COLOR, edgecolor="k", label="error"),
  ]
  fig.legend(handles=handles, loc="lower center", ncol=len(handles), fontsize=9, frameon=False)
  if title:
    fig.suptitle(title, fontsize=11)
  fig.tight_layout(rect=(0, 0.08, 1, 0.95 if title else 1))
  fig.savefig(path, dpi=120)


def fractions_figure(
  path: str | os.PathLike,
  *,
  z: Sequence[int],
  fractions: np.ndarray,
  classes: Sequence[str],
  truth: Mapping[int, np.ndarray] | None = None,
  voxel_size_nm: Sequence[float] | None = None,
) -> None:
  """Writes the phase-fraction profile along z (e.g. porosity per slice) as a PNG.

  Args:
    path: the PNG to write.
    z: [n] slice indices.
    fractions: [n, C] predicted fraction of each class on each slice.
    classes: class names.
    truth: optional z -> [C] truth fractions (on the annotated voxels), drawn as markers.
    voxel_size_nm: (z, y, x); adds the depth in micrometres on a top axis.
  """
  colors = class_colors(len(classes))
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
  ax.set_xlabel("slice z")
  ax.set_ylabel("volume fraction (%)")
  ax.grid(alpha=0.3)
  ax.set_title("predicted phase fractions along z")
  if voxel_size_nm and len(z):
    dz = float(voxel_size_nm[0]) / 1000.0
    top = ax.secondary_xaxis("top", functions=(lambda v: v * dz, lambda v: v / dz))
    top.set_xlabel("depth (µm)")
  ax.legend(handles=handles, fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5))
  fig.tight_layout()
  fig.savefig(path, dpi=120)


def _voxel_text(voxel_size_nm: Sequence[float]) -> str:
  return " x ".join(f"{v:g}" for v in voxel_size_nm) + " nm [z, y, x]"


def structure_figure(path: str | os.PathLike, *, structure: quantify.Quantification) -> None:
  """Writes per-phase bars: volume fraction and largest-cluster share (with the axes
  along which the phase percolates), and surface density S_V.

  Args:
    path: the PNG to write.
    structure: from `quantify.quantify_stack`.
  """
  phases = structure.phases
  names = [p.name for p in phases]
  colors = class_colors(len(phases))
  x = np.arange(len(phases))
  fig = Figure(figsize=(10, 4.2))
  left, right = fig.subplots(1, 2)
  fractions = [100 * p.volume_fraction for p in phases]
  largest = [100 * np.nan_to_num(p.connectivity.largest_fraction) for p in phases]
  left.bar(x - 0.2, fractions, 0.4, color=colors, edgecolor="k", label="volume fraction")
  left.bar(
    x + 0.2, largest, 0.4, color=colors, edgecolor="k", hatch="//", alpha=0.6,
    label="largest connected cluster (share of the phase)",
  )  # fmt: skip
  for i, p in enumerate(phases):
    axes = " ".join(p.connectivity.percolating_axes)
    left.annotate(
      f"percolates {axes}" if axes else "no percolation",
      (x[i], max(fractions[i], largest[i])), xytext=(0, 4), textcoords="offset points",
      ha="center", fontsize=8,
    )  # fmt: skip
  left.set_xticks(x, names)
  left.set_ylim(0, 118)
  left.set_ylabel("%")
  left.set_title("volume fraction and connectivity (6-connected)", fontsize=10)
  left.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.1), ncol=2)
  left.grid(axis="y", alpha=0.3)
  density = [np.nan_to_num(p.surface_density_per_um) for p in phases]
  right.bar(x, density, 0.6, color=colors, edgecolor="k")
  right.set_xticks(x, names)
  right.set_ylabel("surface density S_V (µm² / µm³)")
  right.set_title("interface area per volume", fontsize=10)
  right.grid(axis="y", alpha=0.3)
  fig.suptitle(
    f"{structure.subvolume.describe(structure.voxel_size_nm)}; voxel "
    f"{_voxel_text(structure.voxel_size_nm)}",
    fontsize=9,
  )
  fig.tight_layout(rect=(0, 0, 1, 0.93))
  fig.savefig(path, dpi=120)


def pore_size_figure(path: str | os.PathLike, *, structure: quantify.Quantification) -> None:
  """Writes the volume-weighted size (local thickness) distribution of each phase that
  has one: the share of the phase's volume at each diameter (bars, log-spaced bins)
  and below it (cumulative line), with d10, d50 and d90 marked.

  Args:
    path: the PNG to write.
    structure: from `quantify.quantify_stack`, with sizes for at least one phase.
  """
  sized = [(i, p) for i, p in enumerate(structure.phases) if p.sizes is not None]
  colors = class_colors(len(structure.phases))
  fig = Figure(figsize=(7, 4.2))
  ax = fig.subplots()
  cum_ax = ax.twinx()
  for i, p in sized:
    d, f = p.sizes.diameters_nm, p.sizes.volume_fractions
    lo, hi = max(d.min(), 1e-3), max(d.max(), d.min() * 1.01)
    edges = np.geomspace(lo / 1.05, hi * 1.05, min(30, len(d) + 1))
    hist, _ = np.histogram(d, bins=edges, weights=f)
    ax.bar(
      edges[:-1], 100 * hist, np.diff(edges), align="edge", color=colors[i], alpha=0.45,
      edgecolor="k", linewidth=0.4, label=f"{p.name}: share of its volume",
    )  # fmt: skip
    cum_ax.step(d, 100 * np.cumsum(f), where="post", color=colors[i], lw=1.8)
    for q, value in (("d10", p.sizes.d10_nm), ("d50", p.sizes.d50_nm), ("d90", p.sizes.d90_nm)):
      cum_ax.axvline(value, color=colors[i], ls=":", lw=1)
      cum_ax.annotate(q, (value, 101), ha="center", fontsize=7, annotation_clip=False)
  ax.set_xscale("log")
  ax.set_xlabel("local thickness (diameter, nm)")
  ax.set_ylabel("volume share per bin (%)")
  cum_ax.set_ylabel("cumulative volume (%)")
  cum_ax.set_ylim(0, 105)
  ax.grid(alpha=0.3, which="both")
  if sized:
    ax.legend(fontsize=8, loc="upper left")
  ax.set_title(f"pore-size distribution; voxel {_voxel_text(structure.voxel_size_nm)}", fontsize=9)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
