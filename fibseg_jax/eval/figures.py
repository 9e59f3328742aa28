"""Figures of an evaluation: per-slice panels and the phase-fraction profile along z.

Class colours are the same everywhere (`class_colors`): the synthetic phantom's
palette first (pore near black, C-S-H grey-green, portlandite blue, clinker orange),
then matplotlib's tab10. Figures are drawn on their own `Figure` objects (no pyplot), so
no display is needed and importing this module leaves the caller's matplotlib backend alone.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence

import matplotlib
import numpy as np
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch

from fibseg_jax.data import synth
from fibseg_jax.data import volume as volume_lib

NOT_ANNOTATED_COLOR = (1.0, 1.0, 1.0)
CORRECT_COLOR = (0.78, 0.78, 0.78)
ERROR_COLOR = (0.86, 0.08, 0.10)
# Panels are shown at most this many pixels on a side (nearest-neighbour subsampling).
MAX_DISPLAY_PX = 1024


def class_colors(n: int) -> np.ndarray:
  """RGB colours [n, 3] in [0, 1] for class indices 0..n-1, the same in every figure."""
  palette = [tuple(c) for c in synth.CLASS_COLORS]
  tab = matplotlib.colormaps["tab10"].colors
  palette += [tuple(c) for c in tab if tuple(c) not in palette]
  while len(palette) < n:
    palette += [tuple(c) for c in matplotlib.colormaps["tab20b"].colors]
  return np.asarray(palette[:n], np.float64)


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
