"""Which slice to annotate next: the model's uncertainty over the stack, slice by slice.

The uncertainty of a voxel is the entropy of the blended class probabilities divided by
log(classes), so that 0 is certain and 1 is a uniform guess. It is read from either
array segment.py writes: --uncertainty ([z, y, x] uint8 = round(255 * that), computed
from the unrounded probabilities) or --probabilities ([z, y, x, classes] uint8 =
round(255 p), whose entropy is computed here). A slice's score is the mean over its
voxels; the slices nobody annotated are ranked by it, most uncertain first. Everything
streams one slice at a time, so the stack's size does not matter.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from typing import Any

import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter

from fibseg_jax import outputs
from fibseg_jax.data import palette
from fibseg_jax.eval import figures
from fibseg_jax.infer import store
from fibseg_jax.infer.blend import normalised_entropy

# What each kind of input array holds: its rank and what to call it in messages.
KINDS = {"probabilities": 4, "uncertainty": 3}
_SHAPES = {"probabilities": "[z, y, x, classes]", "uncertainty": "[z, y, x]"}


# Normalised entropy of class probabilities [..., classes] (uint8 as segment.py writes
# them, or float): the function segmentation writes --uncertainty with.
entropy = normalised_entropy


def open_uncertainty_source(path: Any, kind: str | None = None) -> tuple[Any, str]:
  """Opens a probabilities or an uncertainty array written by segment.py.

  Args:
    path: the array.
    kind: "probabilities" or "uncertainty" to require that kind (its flag names it in
      errors); None to take either, told apart by rank (4 or 3).

  Returns:
    (tensorstore, kind).

  Raises:
    store.OutputError: no zarr v3 array at `path`.
    ValueError: an array of another rank, or one segment.py wrote as something else
      (labels, say).
  """
  if kind is not None and kind not in KINDS:
    raise ValueError(f"kind={kind!r}: expected one of {sorted(KINDS)}")
  where = f"--{kind}={path}" if kind else f"{path}"
  seg = store.open_segmentation(path)
  array = seg.array
  found = next((k for k, rank in KINDS.items() if rank == array.rank), None)
  if found is None or (kind is not None and found != kind):
    expected = [kind] if kind else list(KINDS)
    shapes = " or ".join(f"{k} {_SHAPES[k]}" for k in expected)
    raise ValueError(f"{where}: expected {shapes}, got rank {array.rank}")
  if seg.kind is not None and seg.kind != found:
    raise ValueError(f"{where} is segment.py's {seg.kind} array, not its {found} array")
  return array, found


def _slice_map(array: Any, kind: str, z: int) -> np.ndarray:
  """Normalised entropy [y, x] float32 of one slice of an opened array of `kind`."""
  data = array[z].read().result()
  if kind == "probabilities":
    return entropy(data)
  if np.issubdtype(data.dtype, np.integer):
    return data.astype(np.float32) / 255.0
  return data.astype(np.float32)


def slice_uncertainty(path: Any, kind: str | None = None) -> np.ndarray:
  """Mean normalised entropy of every slice.

  Args:
    path: segment.py's --probabilities array [z, y, x, classes] or its --uncertainty
      array [z, y, x] (uint8 / 255).
    kind: require "probabilities" or "uncertainty"; None takes either (by rank).

  Returns:
    `[z]` float64.
  """
  array, kind = open_uncertainty_source(path, kind)
  return np.asarray([float(_slice_map(array, kind, z).mean()) for z in range(array.shape[0])])


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
  kind: str | None = None,
) -> dict[str, Any]:
  """Ranks the slices to annotate next and writes suggest.json and two figures.

  Args:
    probabilities: segment.py's --probabilities array, or its --uncertainty array.
    out: directory for suggest.json, uncertainty_z.png and uncertainty_top.png.
    annotated: slices already annotated (left out of the ranking, marked in the profile).
    top: how many slices to suggest and map.
    kind: require "probabilities" or "uncertainty"; None takes either (by rank).

  Returns:
    The suggest.json document: the input (under its kind), per-slice scores, the
    ranking and the suggested slices.
  """
  array, kind = open_uncertainty_source(probabilities, kind)
  scores = slice_uncertainty(probabilities, kind)
  ranking = rank_slices(scores, annotated)
  chosen = [z for z, _ in ranking[: max(int(top), 0)]]
  try:
    outputs.claim(
      out, kind="suggest", flag="--out", inputs={f"--{kind}": probabilities}, directory=True
    )
  except outputs.OutputError as e:
    raise ValueError(str(e)) from e
  document = {
    kind: os.fspath(probabilities),
    "measure": "mean over the slice of entropy(p) / log(classes); 0 certain, 1 uniform",
    "annotated": sorted(int(z) for z in annotated),
    "slice_uncertainty": [float(s) for s in scores],
    "ranking": [{"z": z, "uncertainty": s} for z, s in ranking],
    "suggested": chosen,
  }
  outputs.write_text(os.path.join(out, "suggest.json"), json.dumps(document, indent=1))
  _profile_figure(
    os.path.join(out, "uncertainty_z.png"), scores, annotated, chosen, source=probabilities
  )
  if chosen:
    maps = {z: _slice_map(array, kind, z) for z in chosen}
    _maps_figure(os.path.join(out, "uncertainty_top.png"), maps, scores, source=probabilities)
  return document


def _figure_context(source: Any) -> tuple[str, tuple[float, ...] | None]:
  """(stack name, (z, y, x) voxel size in nm or None) of segment.py's array `source`,
  from the run record it stored; ("", None) when there is none."""
  if source is None:
    return "", None
  try:
    seg = store.open_segmentation(source)
  except (store.OutputError, ValueError):
    return palette.stack_name(source), None
  return palette.stack_name(seg.source or source), seg.voxel_size_nm


def _profile_figure(path: str, scores, annotated, chosen, *, source: Any = None) -> None:
  """uncertainty_z.png: the mean uncertainty of every slice, annotated and suggested
  slices marked, titled with the stack that `source` (the uncertainty array) came from."""
  stack, voxel = _figure_context(source)
  fig = Figure(figsize=(8, 3.2), dpi=100, layout="constrained")
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
  ax.xaxis.get_major_locator().set_params(integer=True)
  if voxel is not None and len(scores):
    dz = voxel[0] / 1000.0
    depth = ax.secondary_xaxis("top", functions=(lambda v: v * dz, lambda v: v / dz))
    depth.set_xlabel("depth (µm)")
    depth.xaxis.set_major_formatter(FuncFormatter(lambda v, _: palette.plain_number(v)))
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8)
  what = "model uncertainty per slice"
  fig.suptitle(f"{what}: {stack}" if stack else what, fontsize=10)
  fig.savefig(path, format="png")


def _maps_figure(path: str, maps: dict[int, np.ndarray], scores, *, source: Any = None) -> None:
  """uncertainty_top.png: the uncertainty maps of the suggested slices, with a scale bar
  when `source` (the uncertainty array) records the voxel size."""
  stack, voxel = _figure_context(source)
  first = next(iter(maps.values()))
  aspect = voxel[1] / voxel[2] if voxel is not None else 1.0
  height = 3.2 * aspect * first.shape[0] / first.shape[1]
  fig = Figure(figsize=(3.2 * len(maps) + 1.2, height + 0.9), dpi=100, layout="constrained")
  axes = np.atleast_1d(fig.subplots(1, len(maps)))
  for i, (ax, (z, m)) in enumerate(zip(axes, maps.items(), strict=True)):
    step = max(1, math.ceil(max(m.shape) / figures.MAX_DISPLAY_PX))
    shown = m[::step, ::step]
    image = ax.imshow(shown, cmap="magma", vmin=0, vmax=1, aspect=aspect)
    ax.set_title(f"slice {z}: mean {scores[z]:.3f}", fontsize=9)
    ax.set_axis_off()
    if i == 0 and voxel is not None:
      palette.add_scale_bar(ax, voxel[2] * step, shown.shape[1])
  fig.colorbar(image, ax=list(axes), shrink=0.8, label="entropy / log(classes)")
  what = "most uncertain unannotated slices"
  fig.suptitle(f"{what}: {stack}" if stack else what, fontsize=10)
  fig.savefig(path, format="png")
