"""Does the suggested slice beat a random one? And do the members' intervals hold the truth?

On a stack labelled everywhere (the synthetic stack, whose artifacts can drift along z,
so its slices differ), for every seed:

1. a U-Net of the budget is trained on the training slices and segments the whole
   stack, writing its class probabilities: the seeds are the members of an ensemble;
2. the slices outside the training and evaluation ones are ranked by the members'
   disagreement (`uncertainty.suggest` with every member's probabilities, spread along
   z), and, for comparison, by each member's own entropy (the earlier ranking);
3. a U-Net of the same seed is trained with one more slice: the disagreement pick, the
   entropy pick of that seed's model, or a random slice (another one per seed);
4. each is scored on the evaluation slices.

Besides, every structure quantity (`quantify`) of the members' segmentations gets its
range, and whether the truth's value lies in it is counted (`quantify.coverage`).
Writes ranking.json and ranking.md; every run resumes.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from fibseg_jax import infer
from fibseg_jax.data import volume as volume_lib
from fibseg_jax.eval import calibration, quantify, uncertainty
from fibseg_jax.infer import store
from fibseg_jax.study import budget as budget_lib
from fibseg_jax.study import runs
from fibseg_jax.study.context import OneStack, Option, StudyContext, seed_stats, stat_text

KIND = "ranking study"
PICKS = ("disagreement", "entropy", "random")


def run_ranking(
  out: str,
  budget: budget_lib.Budget,
  stack: OneStack,
  *,
  log=print,
) -> dict[str, Any]:
  """The ranking test and the interval coverage; writes out/ranking.{json,md}."""
  runs.claim_study_directory(out, stack.volume, kind=KIND)
  vol = volume_lib.open_volume(stack.volume)
  exclude = {int(z) for z in (*stack.train_slices, *stack.eval_slices)}
  candidates = [z for z in vol.metadata.annotated_slices if z not in exclude]
  if len(candidates) < 2:
    raise ValueError(
      f"{stack.volume}: the ranking test needs >= 2 labelled slices outside the training and "
      f"evaluation ones, found {candidates}"
    )
  if len(stack.seeds) < 2:
    raise ValueError(
      f"--seeds: the members' disagreement needs >= 2 seeds, got {list(stack.seeds)}"
    )
  cell = dataclasses.replace(stack, volume=os.path.abspath(stack.volume))
  base = {}
  for seed in stack.seeds:
    base[seed] = runs.train_and_score(
      os.path.join(out, f"base_s{seed}"),
      budget,
      runs.cell_settings(budget, cell, seed),
      cell,
      seed,
      whole_stack=True,
    )
    log(f"seed {seed}: {len(stack.train_slices)} slices -> mIoU {base[seed]['mean_iou']:.4f}")
  probs = [os.path.join(out, f"base_s{s}", "probs.zarr") for s in stack.seeds]
  suggestion = uncertainty.suggest(
    probs, os.path.join(out, "suggest"), annotated=sorted(exclude), top=3, classes=vol.classes
  )
  ranked = [z for z in suggestion["suggested"] if z in candidates]
  ranked += [row["z"] for row in suggestion["ranking"] if row["z"] in candidates]
  picks: dict[str, dict[int, int]] = {"disagreement": {s: int(ranked[0]) for s in stack.seeds}}
  picks["entropy"] = {}
  picks["random"] = {}
  for seed, path in zip(stack.seeds, probs, strict=True):
    scores = uncertainty.slice_uncertainty(path, "probabilities")
    own = [z for z, _ in uncertainty.rank_slices(scores, sorted(exclude)) if z in candidates]
    picks["entropy"][seed] = int(own[0])
    others = [z for z in candidates if z != ranked[0]]
    picks["random"][seed] = int(np.random.default_rng([int(seed), 4]).choice(others))
  rows = {}
  for pick in PICKS:
    values = []
    for seed in stack.seeds:
      z = picks[pick][seed]
      four = sorted({*map(int, stack.train_slices), z})
      four_slices = dataclasses.replace(cell, train_slices=four)
      r = runs.train_and_score(
        os.path.join(out, f"{pick}_s{seed}"),
        budget,
        runs.cell_settings(budget, four_slices, seed),
        four_slices,
        seed,
      )
      values.append(r["mean_iou"])
      log(f"seed {seed}: + {pick} slice {z} -> mIoU {r['mean_iou']:.4f}")
    rows[pick] = {
      "slices": [picks[pick][s] for s in stack.seeds],
      "values": values,
      "mean_iou": seed_stats(values),
    }
  rows["three slices"] = {
    "slices": [],
    "values": [base[s]["mean_iou"] for s in stack.seeds],
    "mean_iou": seed_stats([base[s]["mean_iou"] for s in stack.seeds]),
  }
  diff = [
    a - b for a, b in zip(rows["disagreement"]["values"], rows["random"]["values"], strict=True)
  ]
  document = {
    "volume": stack.volume,
    "train_slices": [int(z) for z in stack.train_slices],
    "eval_slices": [int(z) for z in stack.eval_slices],
    "candidates": candidates,
    "seeds": [int(s) for s in stack.seeds],
    "budget": budget.to_json(),
    "suggestion": {k: suggestion[k] for k in ("measure", "min_gap", "suggested")},
    "slice_disagreement": suggestion["slice_uncertainty"],
    "rows": rows,
    "disagreement_minus_random": seed_stats(diff),
    "intervals": _intervals(out, vol, stack.seeds),
  }
  runs.write_document(out, "ranking", document, markdown)
  return document


def _intervals(out: str, vol: volume_lib.Volume, seeds: Sequence[int]) -> dict[str, Any]:
  """The members' ranges of every structure quantity and whether the truth lies in them."""
  voxel = vol.metadata.voxel_size_nm
  sized = quantify.size_classes(vol.classes)
  members = [
    quantify.quantify_stack(
      infer.open_array(seg_path(out, s)),
      vol.classes,
      voxel,
      sizes_for=sized,
    )
    for s in seeds
  ]
  truth = quantify.quantify_stack(vol.labels, vol.classes, voxel, sizes_for=sized)
  interval = quantify.intervals(members, f"the {len(seeds)} seeds' U-Nets")
  covered = quantify.coverage(interval, truth)
  flat = [v for phase in covered.values() for v in phase.values()]
  truth_values = {
    p.name: {key: float(quantify.INTERVAL_QUANTITIES[key](p)) for key in interval["phases"][p.name]}
    for p in truth.phases
  }
  # The volume fractions corrected on each member's held-out validation blocks
  # (`calibration`): for the ensemble, and for each seed alone.
  blocks = []
  for s in seeds:
    seg = store.open_segmentation(seg_path(out, s))
    split = calibration.training_split(seg.run)
    blocks.append(calibration.held_out_blocks(vol, seg.array, **split))
  calibrated = calibration.calibrated_intervals(members, blocks, interval["source"])
  per_seed = {
    int(s): quantify.coverage(
      calibration.calibrated_intervals([m], [b], f"seed {s}", seed=int(s)), truth
    )
    for s, m, b in zip(seeds, members, blocks, strict=True)
  }
  return {
    **interval,
    "truth": truth_values,
    "covered": covered,
    "covered_share": float(np.mean(flat)) if flat else None,
    "calibrated": {
      "kind": calibrated["kind"],
      "phases": calibrated["phases"],
      "covered": quantify.coverage(calibrated, truth),
      "covered_per_seed": per_seed,
    },
  }


def seg_path(out: str, seed: int) -> str:
  """The segmentation of seed `seed`'s three-slice U-Net."""
  return os.path.join(out, f"base_s{seed}", "seg.zarr")


def markdown(document: dict[str, Any]) -> str:
  """ranking.md: the four rows, the paired difference and the interval coverage."""
  names = {
    "three slices": "training slices only",
    "disagreement": "+ the members' top-disagreement slice (spread along z)",
    "entropy": "+ the seed's own most uncertain slice (entropy)",
    "random": "+ a random slice",
  }
  lines = ["| fourth slice | slice per seed | mean IoU |", "|---|---|---|"]
  for key in ("three slices", *PICKS):
    row = document["rows"][key]
    chosen = ",".join(map(str, row["slices"])) or "-"
    lines.append(f"| {names[key]} | {chosen} | {stat_text(row['mean_iou'], 4)} |")
  iv = document["intervals"]
  lines += [
    "",
    "Disagreement minus random (paired by seed): "
    f"{stat_text(document['disagreement_minus_random'], 4)}.",
    f"Seeds {document['seeds']}; scored on slices {document['eval_slices']}; trained on "
    f"{document['train_slices']} plus the fourth slice; budget {document['budget']['name']}.",
    "",
    f"Intervals over {iv['source']}: the truth lies in the members' range for "
    f"{sum(v for p in iv['covered'].values() for v in p.values())} of "
    f"{sum(len(p) for p in iv['covered'].values())} (phase, quantity) pairs.",
    "",
    "| phase | quantity | members' range | truth | inside |",
    "|---|---|---|---|---|",
  ]
  for phase, entry in iv["phases"].items():
    for key, r in entry.items():
      inside = "yes" if iv["covered"][phase][key] else "no"
      lines.append(
        f"| {phase} | {key} | {r['min']:.4g} .. {r['max']:.4g} | "
        f"{iv['truth'][phase][key]:.4g} | {inside} |"
      )
  cal = iv.get("calibrated")
  if cal:
    seeds = cal["covered_per_seed"]
    lines += [
      "",
      f"Calibrated volume fractions ({cal['kind']}):",
      "",
      "| phase | calibrated interval (all members) | truth | inside | seeds whose own "
      "calibrated interval holds it |",
      "|---|---|---|---|---|",
    ]
    for phase, entry in cal["phases"].items():
      r = entry["volume_fraction"]
      inside = "yes" if cal["covered"][phase]["volume_fraction"] else "no"
      held = sum(bool(c[phase]["volume_fraction"]) for c in seeds.values())
      lines.append(
        f"| {phase} | {r['min']:.4g} .. {r['max']:.4g} | "
        f"{iv['truth'][phase]['volume_fraction']:.4g} | {inside} | {held} of {len(seeds)} |"
      )
  return "\n".join(lines) + "\n"


USAGE = r"""Does annotating the suggested slice beat annotating a random one?

  fibseg study ranking --out=ranking/ [--budget=quick] [--seeds=0,1,2] [--drift=1]
  fibseg study ranking --out=ranking_real/ --volume=vol.zarr --train_slices=4,8,12 \
    --eval_slices=16

Trains a U-Net per seed on the training slices (the members of an ensemble), ranks the
other labelled slices by the members' disagreement (spread along z, as `fibseg suggest`
does), and trains each seed again with one more slice: the suggested one, the seed's
own most uncertain one (entropy) or a random one; all scored on --eval_slices. Also
counts how often the truth's phase fractions, connectivity, surface density and pore
sizes fall inside the members' ranges. Writes ranking.json and ranking.md. Without
--volume a synthetic stack labelled on every slice is generated in --out, its artifacts
growing along z by --drift (so its slices differ). Reruns resume.
"""

OPTIONS = (
  Option(
    "drift",
    "float",
    1.0,
    "Growth of the synthetic stack's artifacts along z (1 = twice at the end).",
  ),
)


def run(ctx: StudyContext, drift: float = 1.0) -> dict[str, Any]:
  """`fibseg study ranking`: on a synthetic stack labelled on every slice, drifting by `drift`."""
  if drift < 0:
    raise ValueError(f"--drift={drift}: expected a number >= 0")
  runs.claim_study_directory(ctx.out, ctx.volume, kind=KIND)
  stack = ctx.stack(annotate=range(ctx.budget.shape[0]), drift=drift)
  document = run_ranking(ctx.out, ctx.budget, stack, log=ctx.log)
  ctx.log(open(os.path.join(ctx.out, "ranking.md")).read())
  ctx.log(f"wrote {ctx.out}/ranking.json, ranking.md")
  return document
