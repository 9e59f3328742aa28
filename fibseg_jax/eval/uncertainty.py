"""Which slice to annotate next: the model's uncertainty over the stack, slice by slice.

The uncertainty of a voxel is the entropy of the blended class probabilities that
segment.py writes with --probabilities ([z, y, x, classes] uint8 = round(255 p)),
divided by log(classes) so that 0 is certain and 1 is a uniform guess. A slice's score is
the mean over its voxels; the slices nobody annotated are ranked by it, most uncertain
first. Everything streams one slice at a time, so the stack's size does not matter.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from typing import Any

import numpy as np
from matplotlib.figure import Figure

from fibseg_jax.eval import figures
from fibseg_jax.infer import store


def entropy(probabilities: np.ndarray) -> np.ndarray:
  """Normalised entropy of class probabilities.

  Args:
    probabilities: `[..., classes]`, uint8 (round(255 p), as segment.py writes) or float.

  Returns:
    `[...]` float32 in [0, 1]: entropy / log(classes); 0 for a one-class model.
  """
  p = np.asarray(probabilities, np.float32)
  if np.issubdtype(np.asarray(probabilities).dtype, np.integer):
    p = p / 255.0
  classes = p.shape[-1]
  if classes < 2:
    return np.zeros(p.shape[:-1], np.float32)
  # uint8 rounding leaves sums near, not at, 1.
  p = p / np.maximum(p.sum(axis=-1, keepdims=True), 1e-12)
  h = -np.sum(np.where(p > 0, p * np.log(np.maximum(p, 1e-12)), 0.0), axis=-1)
  return (h / np.log(classes)).astype(np.float32)


def slice_uncertainty(probabilities: Any) -> np.ndarray:
  """Mean normalised entropy of every slice of a probabilities array.

  Args:
    probabilities: path of segment.py's --probabilities array [z, y, x, classes].

  Returns:
    `[z]` float64.
  """
  array = store.open_array(probabilities)
  if array.rank != 4:
    raise ValueError(
      f"--probabilities={probabilities}: expected [z, y, x, classes], got rank {array.rank}"
    )
  return np.asarray(
    [float(entropy(array[z].read().result()).mean()) for z in range(array.shape[0])]
  )


def rank_slices(scores: Sequence[float], annotated: Sequence[int] = ()) -> list[tuple[int, float]]:
  """Unannotated slices, most uncertain first.

  Args:
    scores: mean uncertainty of each slice, `[z]`.
    annotated: slices that already have labels (left out).

  Returns:
    [(z, score)] sorted by decreasing score (ties: lower z first).
  """
  skip = {int(z) for z in annotated}
  order = sorted((z for z in range(len(scores)) if z not in skip), key=lambda z: (-scores[z], z))
  return [(z, float(scores[z])) for z in order]


def suggest(
  probabilities: Any,
  out: str | os.PathLike,
  *,
  annotated: Sequence[int] = (),
  top: int = 3,
) -> dict[str, Any]:
  """Ranks the slices to annotate next and writes suggest.json and two figures.

  Args:
    probabilities: segment.py's --probabilities array.
    out: directory for suggest.json, uncertainty_z.png and uncertainty_top.png.
    annotated: slices already annotated (left out of the ranking, marked in the profile).
    top: how many slices to suggest and map.

  Returns:
    The suggest.json document: per-slice scores, the ranking and the suggested slices.
  """
  scores = slice_uncertainty(probabilities)
  ranking = rank_slices(scores, annotated)
  chosen = [z for z, _ in ranking[: max(int(top), 0)]]
  os.makedirs(out, exist_ok=True)
  document = {
    "probabilities": os.fspath(probabilities),
    "measure": "mean over the slice of entropy(p) / log(classes); 0 certain, 1 uniform",
    "annotated": sorted(int(z) for z in annotated),
    "slice_uncertainty": [float(s) for s in scores],
    "ranking": [{"z": z, "uncertainty": s} for z, s in ranking],
    "suggested": chosen,
  }
  with open(os.path.join(out, "suggest.json"), "w") as f:
    json.dump(document, f, indent=1)
  _profile_figure(os.path.join(out, "uncertainty_z.png"), scores, annotated, chosen)
  if chosen:
    array = store.open_array(probabilities)
    maps = {z: entropy(array[z].read().result()) for z in chosen}
    _maps_figure(os.path.join(out, "uncertainty_top.png"), maps, scores)
  return document


def _profile_figure(path: str, scores, annotated, chosen) -> None:
  fig = Figure(figsize=(8, 3), dpi=100, layout="constrained")
  ax = fig.subplots()
  z = np.arange(len(scores))
  ax.plot(z, scores, color="0.2", marker=".", label="mean uncertainty")
  if len(annotated):
    a = np.asarray(sorted(annotated))
    ax.scatter(a, np.asarray(scores)[a], color="tab:green", zorder=3, label="annotated")
  if chosen:
    c = np.asarray(chosen)
    ax.scatter(c, np.asarray(scores)[c], color="tab:red", zorder=3, label="suggested next")
  ax.set_xlabel("slice z")
  ax.set_ylabel("entropy / log(classes)")
  ax.set_ylim(0, max(float(np.max(scores)) * 1.1, 1e-3) if len(scores) else 1)
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8)
  fig.savefig(path, format="png")


def _maps_figure(path: str, maps: dict[int, np.ndarray], scores) -> None:
  fig = Figure(figsize=(3.2 * len(maps), 3.4), dpi=100, layout="constrained")
  axes = np.atleast_1d(fig.subplots(1, len(maps)))
  for ax, (z, m) in zip(axes, maps.items(), strict=True):
    step = max(1, math.ceil(max(m.shape) / figures.MAX_DISPLAY_PX))
    image = ax.imshow(m[::step, ::step], cmap="magma", vmin=0, vmax=1)
    ax.set_title(f"z = {z}: mean {scores[z]:.3f}", fontsize=9)
    ax.set_axis_off()
  fig.colorbar(image, ax=list(axes), shrink=0.8, label="entropy / log(classes)")
  fig.savefig(path, format="png")
