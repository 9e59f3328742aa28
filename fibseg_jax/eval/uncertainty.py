"""Which slice to annotate next: the model's uncertainty over the stack, slice by slice.

The uncertainty of a voxel is the entropy of the blended class probabilities divided by
log(classes), so that 0 is certain and 1 is a uniform guess. It is read from either
array `fibseg segment` writes: --uncertainty ([z, y, x] uint8 = round(255 * that), computed
from the unrounded probabilities) or --probabilities ([z, y, x, classes] uint8 =
round(255 p), whose entropy is computed here). A slice's score is the mean over its
voxels; the slices nobody annotated are ranked by it, most uncertain first. Everything
streams one slice at a time, so the stack's size does not matter.

Entropy alone is high wherever a boundary is blurred, on every slice alike. Given the
probabilities of several models (the members of a seed ensemble, or TTA passes), a slice
is scored instead by how much they contradict each other (`disagreement`, the mutual
information of BALD), and every candidate gets the expected narrowing of the phase
fractions' interval between the members. The suggestions keep a distance along z from
the annotated slices and from each other (`choose_spread`), so two neighbours of one
annotated slice are not both suggested.
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
from fibseg_jax.data import volume as volume_lib
from fibseg_jax.eval import figures
from fibseg_jax.infer import store
from fibseg_jax.infer.blend import normalised_entropy

# What each kind of input array holds: its rank and what to call it in messages.
KINDS = {"probabilities": 4, "uncertainty": 3}
_SHAPES = {"probabilities": "[z, y, x, classes]", "uncertainty": "[z, y, x]"}


# Normalised entropy of class probabilities [..., classes] (uint8 as `fibseg segment` writes
# them, or float): the function segmentation writes --uncertainty with.
entropy = normalised_entropy


def open_uncertainty_source(path: Any, kind: str | None = None) -> tuple[Any, str]:
  """Opens a probabilities or an uncertainty array written by `fibseg segment`.

  Args:
    path: the array.
    kind: "probabilities" or "uncertainty" to require that kind (its flag names it in
      errors); None to take either, told apart by rank (4 or 3).

  Returns:
    (tensorstore, kind).

  Raises:
    store.OutputError: no zarr v3 array at `path`.
    ValueError: an array of another rank, or one `fibseg segment` wrote as something else
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
    raise ValueError(f"{where} is `fibseg segment`'s {seg.kind} array, not its {found} array")
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
    path: `fibseg segment`'s --probabilities array [z, y, x, classes] or its --uncertainty
      array [z, y, x] (uint8 / 255).
    kind: require "probabilities" or "uncertainty"; None takes either (by rank).

  Returns:
    `[z]` float64.
  """
  array, kind = open_uncertainty_source(path, kind)
  return np.asarray([float(_slice_map(array, kind, z).mean()) for z in range(array.shape[0])])


def _probabilities(p: np.ndarray) -> np.ndarray:
  """Class probabilities [..., classes] float32 summing to 1 (uint8 read as value / 255)."""
  p = np.asarray(p)
  p = p.astype(np.float32) / 255.0 if np.issubdtype(p.dtype, np.integer) else p
  p = np.asarray(p, np.float32)
  return p / np.maximum(p.sum(axis=-1, keepdims=True), np.float32(1e-12))


def disagreement(members: Sequence[np.ndarray]) -> np.ndarray:
  """How much ensemble members (or TTA passes) contradict each other, per voxel.

  The mutual information between a member's vote and the class (BALD, Houlsby et al.
  2011): the entropy of the members' mean minus the mean of their entropies, divided by
  log(classes). 0 where every member says the same, however unsure it is (an ambiguous
  boundary all of them see); high where confident members disagree, which another
  annotated slice can settle.

  Args:
    members: >= 2 arrays [..., classes] of the same shape (uint8 as `fibseg segment` writes
      them, or float).

  Returns:
    `[...]` float32 in [0, 1].
  """
  ps = [_probabilities(m) for m in members]
  if len(ps) < 2:
    raise ValueError(f"disagreement needs >= 2 members, got {len(ps)}")
  mean_entropy = np.mean([entropy(p) for p in ps], axis=0)
  return np.clip(entropy(np.mean(ps, axis=0)) - mean_entropy, 0.0, 1.0).astype(np.float32)


def member_scores(paths: Sequence[Any]) -> tuple[np.ndarray, np.ndarray]:
  """Per slice: the members' mean disagreement and each member's phase fractions.

  Args:
    paths: >= 2 probability arrays [z, y, x, classes] from `fibseg segment` (one per ensemble
      member or TTA pass), of one shape.

  Returns:
    (scores `[z]` float64, fractions `[z, members, classes]` float64: the share of each
    slice's voxels that a member's most probable class gives each phase).
  """
  if len(paths) < 2:
    raise ValueError(f"--probabilities: give >= 2 members to rank by disagreement, got {paths}")
  arrays = [open_uncertainty_source(p, "probabilities")[0] for p in paths]
  shapes = {tuple(a.shape) for a in arrays}
  if len(shapes) > 1:
    raise ValueError(
      "--probabilities: members differ in shape: "
      + ", ".join(f"{p} {list(a.shape)}" for p, a in zip(paths, arrays, strict=True))
    )
  depth, classes = arrays[0].shape[0], arrays[0].shape[-1]
  scores = np.zeros(depth)
  fractions = np.zeros((depth, len(arrays), classes))
  for z in range(depth):
    data = [a[z].read().result() for a in arrays]
    scores[z] = float(disagreement(data).mean())
    for m, d in enumerate(data):
      votes = np.bincount(np.argmax(d, axis=-1).ravel(), minlength=classes)
      fractions[z, m] = votes / max(votes.sum(), 1)
  return scores, fractions


def expected_narrowing(fractions: np.ndarray, z: int) -> np.ndarray:
  """How much annotating slice `z` is expected to narrow each phase fraction's interval.

  The interval of a phase's stack fraction is the range over the members; if slice `z`
  were annotated, the members would (to a first approximation) agree there: each
  member's slice fractions are replaced by the members' mean and the range is taken
  again. An estimate, stated as such: it ignores how the new labels change the other
  slices.

  Args:
    fractions: `[z, members, classes]` from `member_scores`.
    z: the candidate slice.

  Returns:
    `[classes]`: width of the range now minus width after, in fraction units (>= 0 up to
    rounding).
  """
  depth = fractions.shape[0]
  stack = fractions.mean(axis=0)  # [members, classes]
  after = stack - (fractions[z] - fractions[z].mean(axis=0)) / depth
  return np.ptp(stack, axis=0) - np.ptp(after, axis=0)


def choose_spread(
  ranking: Sequence[tuple[int, float]],
  annotated: Sequence[int],
  top: int,
  min_gap: int,
) -> list[int]:
  """The `top` best slices of `ranking` at least `min_gap` slices from the annotated ones
  and from each other; where too few are left, the gap is halved until it fits.

  Args:
    ranking: [(z, score)], best first (`rank_slices`).
    annotated: slices already labelled.
    top: how many to choose.
    min_gap: the smallest distance along z to keep (1 = any other slice).
  """
  chosen: list[int] = []
  gap = max(int(min_gap), 1)
  while len(chosen) < top:
    taken = [int(z) for z in annotated] + chosen
    pick = next(
      (z for z, _ in ranking if z not in chosen and all(abs(z - t) >= gap for t in taken)), None
    )
    if pick is not None:
      chosen.append(int(pick))
    elif gap > 1:
      gap //= 2
    else:
      break
  return chosen


def explain_choice(
  ranking: Sequence[tuple[int, float]],
  annotated: Sequence[int],
  chosen: Sequence[int],
  min_gap: int,
) -> dict[str, list[dict[str, int]]]:
  """Why `choose_spread` chose what it did: each suggestion's rank by uncertainty, and
  each more uncertain slice it passed over with the slice it was too close to.

  Args:
    ranking: [(z, score)], best first (`rank_slices`).
    annotated: slices already labelled.
    chosen: the suggestions (`choose_spread`).
    min_gap: the gap asked for.

  Returns:
    {"suggested": [{"z", "rank"}], "skipped": [{"z", "rank", "near", "distance",
    "near_annotated" (1 or 0)}]}, ranks counted from 1 among `len(ranking)` candidates;
    a slice is skipped when it ranks above the last suggestion and is not one.
  """
  rank = {int(z): i + 1 for i, (z, _) in enumerate(ranking)}
  suggested = [{"z": int(z), "rank": rank[int(z)]} for z in chosen]
  worst = max((row["rank"] for row in suggested), default=0)
  skipped = []
  for z, _ in ranking[: max(worst - 1, 0)]:
    if z in chosen:
      continue
    # The nearest slice it had to keep its distance from (annotated or suggested).
    blockers = [(abs(z - t), 1, int(t)) for t in annotated]
    blockers += [(abs(z - t), 0, int(t)) for t in chosen]
    distance, is_annotated, near = min(blockers, key=lambda b: (b[0], -b[1]))
    skipped.append(
      {
        "z": int(z),
        "rank": rank[int(z)],
        "near": near,
        "distance": int(distance),
        "near_annotated": is_annotated,
      }
    )
  return {"suggested": suggested, "skipped": skipped}


def default_gap(depth: int, annotated: int, top: int) -> int:
  """max(2, depth / (2 (annotated + top))): the suggestions share the stack with the
  annotated slices, and no suggestion is a neighbour of an annotated slice."""
  return max(2, depth // (2 * max(annotated + top, 1)))


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
  probabilities: Any | Sequence[Any],
  out: str | os.PathLike,
  *,
  annotated: Sequence[int] = (),
  top: int = 3,
  kind: str | None = None,
  min_gap: int | None = None,
  classes: Sequence[str] | None = None,
  numbering: volume_lib.SliceNumbers | None = None,
) -> dict[str, Any]:
  """Ranks the slices to annotate next and writes suggest.json and two figures.

  With one array the score of a slice is its mean entropy; with several probability
  arrays (the members of an ensemble, or TTA passes) it is their mean disagreement
  (`disagreement`), and every candidate also gets the expected narrowing of each phase
  fraction's interval (`expected_narrowing`). The suggestions are the best-scored
  slices at least `min_gap` slices from the annotated ones and from each other
  (`choose_spread`).

  Args:
    probabilities: `fibseg segment`'s --probabilities array, or its --uncertainty array; or a
      list of >= 2 probability arrays.
    out: directory for suggest.json, uncertainty_z.png and uncertainty_top.png.
    annotated: slices already annotated (left out of the ranking, marked in the profile).
    top: how many slices to suggest and map.
    kind: require "probabilities" or "uncertainty"; None takes either (by rank).
    min_gap: smallest distance along z between a suggestion and an annotated or another
      suggested slice; default `default_gap`.
    classes: class names for the narrowing table (default class0, class1, ...).
    numbering: the user's slice numbers (`volume_lib.SliceNumbers`), written beside z
      ("slice") and shown in the figures; default number = z.

  Returns:
    The suggest.json document: the input (under its kind), per-slice scores, the
    ranking, the suggested slices and why (`explain_choice`).
  """
  members = [probabilities] if isinstance(probabilities, str | os.PathLike) else list(probabilities)
  fractions = None
  if len(members) > 1:
    scores, fractions = member_scores(members)
    kind = "probabilities"
    array = None
    measure = (
      f"mean over the slice of the disagreement between {len(members)} members: "
      "(entropy of their mean - mean of their entropies) / log(classes); 0 = they agree"
    )
    source = [os.fspath(m) for m in members]
  else:
    array, kind = open_uncertainty_source(members[0], kind)
    scores = slice_uncertainty(members[0], kind)
    measure = "mean over the slice of entropy(p) / log(classes); 0 certain, 1 uniform"
    source = os.fspath(members[0])
  ranking = rank_slices(scores, annotated)
  gap = default_gap(len(scores), len(annotated), top) if min_gap is None else int(min_gap)
  chosen = choose_spread(ranking, annotated, max(int(top), 0), gap)
  try:
    outputs.claim(out, kind="suggest", flag="--out", inputs={f"--{kind}": source}, directory=True)
  except outputs.OutputError as e:
    raise ValueError(str(e)) from e
  numbers = numbering or volume_lib.SliceNumbers.of((), len(scores))
  rows = [
    {"z": z, "slice": numbers.label(z), "rank": i + 1, "uncertainty": s}
    for i, (z, s) in enumerate(ranking)
  ]
  document = {
    kind: source,
    "measure": measure,
    "slice_numbering": "z counts from 0; slice is the number of the stack's file",
    "annotated": sorted(int(z) for z in annotated),
    "slice_uncertainty": [float(s) for s in scores],
    "min_gap": gap,
    "ranking": rows,
    "suggested": chosen,
    "suggested_slices": numbers.labels(chosen),
    "explanation": explain_choice(ranking, annotated, chosen, gap),
  }
  if fractions is not None:
    names = list(classes) if classes else [f"class{i}" for i in range(fractions.shape[-1])]
    stack = fractions.mean(axis=0)
    document["fraction_interval"] = {
      "what": f"range over the {len(members)} members of each phase's stack fraction "
      "(each member's most probable class per voxel)",
      **{n: [float(stack[:, i].min()), float(stack[:, i].max())] for i, n in enumerate(names)},
    }
    for row in rows:
      narrowing = expected_narrowing(fractions, row["z"])
      row["expected_narrowing"] = {n: float(narrowing[i]) for i, n in enumerate(names)}
  outputs.write_text(os.path.join(out, "suggest.json"), json.dumps(document, indent=1))
  label = "disagreement / log(classes)" if fractions is not None else "entropy / log(classes)"
  first = members[0]
  _profile_figure(
    os.path.join(out, "uncertainty_z.png"),
    scores,
    annotated,
    chosen,
    source=first,
    label=label,
    numbers=numbers,
  )
  if chosen:
    if array is None:
      opened = [open_uncertainty_source(m, "probabilities")[0] for m in members]
      maps = {z: disagreement([a[z].read().result() for a in opened]) for z in chosen}
    else:
      maps = {z: _slice_map(array, kind, z) for z in chosen}
    _maps_figure(
      os.path.join(out, "uncertainty_top.png"),
      maps,
      scores,
      source=first,
      label=label,
      numbers=numbers,
    )
  return document


def _figure_context(source: Any) -> tuple[str, tuple[float, ...] | None]:
  """(stack name, (z, y, x) voxel size in nm or None) of `fibseg segment`'s array `source`,
  from the run record it stored; ("", None) when there is none."""
  if source is None:
    return "", None
  try:
    seg = store.open_segmentation(source)
  except (store.OutputError, ValueError):
    return palette.stack_name(source), None
  return palette.stack_name(seg.source or source), seg.voxel_size_nm


def _profile_figure(
  path: str,
  scores,
  annotated,
  chosen,
  *,
  source: Any = None,
  label: str = "entropy / log(classes)",
  numbers: volume_lib.SliceNumbers | None = None,
) -> None:
  """uncertainty_z.png: the mean uncertainty of every slice, annotated and suggested
  slices marked, titled with the stack that `source` (the uncertainty array) came from."""
  stack, voxel = _figure_context(source)
  fig = Figure(figsize=(8, 3.2), dpi=100, layout="constrained")
  ax = fig.subplots()
  numbers = numbers or volume_lib.SliceNumbers.of((), len(scores))
  z = np.asarray(numbers.labels(range(len(scores))))  # the x axis: the files' numbers
  ax.plot(z, scores, color="0.2", marker=".", label="mean uncertainty")
  if len(annotated):
    a = np.asarray(sorted(annotated))
    ax.scatter(z[a], np.asarray(scores)[a], color="tab:green", zorder=3, label="annotated")
  if chosen:
    c = np.asarray(chosen)
    ax.scatter(z[c], np.asarray(scores)[c], color="tab:red", zorder=3, label="suggested next")
  ax.set_xlabel("slice number")
  ax.set_ylabel(label)
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


def _maps_figure(
  path: str,
  maps: dict[int, np.ndarray],
  scores,
  *,
  source: Any = None,
  label: str = "entropy / log(classes)",
  numbers: volume_lib.SliceNumbers | None = None,
) -> None:
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
    shown_z = numbers.label(z) if numbers else z
    ax.set_title(f"slice {shown_z}: mean {scores[z]:.3f}", fontsize=9)
    ax.set_axis_off()
    if i == 0 and voxel is not None:
      palette.add_scale_bar(ax, voxel[2] * step, shown.shape[1])
  fig.colorbar(image, ax=list(axes), shrink=0.8, label=label)
  what = "suggested slices"
  fig.suptitle(f"{what}: {stack}" if stack else what, fontsize=10)
  fig.savefig(path, format="png")
