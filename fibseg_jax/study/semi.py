"""Learning from the unannotated slices, measured: semi-supervised training and TTA.

Two experiments, both resumable (a run directory with `result.json` is never redone):

* `run_fourway`: for every seed, a supervised and a semi-supervised network with the
  same step budget, each scored on the evaluation slices without and with test-time
  augmentation: the four rows supervised / + semi / + TTA / + both, as mean and std over
  seeds, overall and per class.
* with --suggest, the slice test: the ranking study's experiment (`ranking.run_ranking`:
  the members' disagreement pick, each seed's own entropy pick and a random slice as a
  fourth annotated slice), run on the same stack and seeds into OUT/ranking/. (The
  first semi studies ran it on their own, into OUT/suggest/suggestion.json.)
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from fibseg_jax.data import volume as volume_lib
from fibseg_jax.study import budget as budget_lib
from fibseg_jax.study import ranking, runs
from fibseg_jax.study.context import OneStack, Option, StudyContext, seed_stats

# The rows of the four-way table: (name, training variant, test-time augmentation).
ROWS = (
  ("supervised", "supervised", False),
  ("+ semi", "semi", False),
  ("+ TTA", "supervised", True),
  ("+ both", "semi", True),
)


KIND = "semi study"
# The tables of the first semi studies, written before folders were claimed.
LEGACY = ("fourway.json", "suggestion.json")


def _segment_and_score(
  workdir: str | Sequence[str],
  output: str,
  budget: budget_lib.Budget,
  vol: volume_lib.Volume,
  eval_slices: Sequence[int],
  *,
  tta: bool,
) -> dict[str, Any]:
  """Segments the evaluation slices only (with one model or an ensemble) and scores them."""
  scored, segmented = runs.segment_and_score(
    workdir, vol, output, budget, vol, eval_slices, tta=tta, only_slices=eval_slices
  )
  return {**scored, "segment_seconds": segmented.seconds}


def fourway_run(
  directory: str,
  budget: budget_lib.Budget,
  stack: OneStack,
  seed: int,
  semi: Mapping[str, Any] | None,
) -> dict[str, Any]:
  """One network of the four-way table (semi-supervised when `semi` is given), scored
  without and with TTA."""
  settings = runs.cell_settings(budget, stack, seed, semi=dict(semi or {}))
  done = runs.cached(directory, settings)
  if done is not None:
    return done
  configure = (lambda config: config.semi.update(dict(semi))) if semi else None
  workdir, seconds = runs.train_unet(directory, budget, stack, seed, configure)
  vol = volume_lib.open_volume(stack.volume)
  result = {"settings": settings, "seed": int(seed), "train_seconds": seconds}
  for tta in (False, True):
    output = os.path.join(directory, "seg_tta.zarr" if tta else "seg.zarr")
    result["tta" if tta else "plain"] = _segment_and_score(
      workdir, output, budget, vol, stack.eval_slices, tta=tta
    )
  return runs.write_result(directory, result)


def _row(name: str, scored: Sequence[dict[str, Any]], classes: Sequence[str]) -> dict[str, Any]:
  miou = [s["mean_iou"] for s in scored]
  per_class = {c: seed_stats([s["per_class_iou"][c] for s in scored]) for c in classes}
  return {"name": name, "mean_iou": seed_stats(miou), "values": miou, "per_class": per_class}


def run_fourway(
  out: str,
  budget: budget_lib.Budget,
  stack: OneStack,
  *,
  semi: Mapping[str, Any],
  log=print,
) -> dict[str, Any]:
  """The four-way table over `seeds`; writes out/fourway.json and returns it."""
  runs.claim_study_directory(out, stack.volume, kind=KIND, legacy=LEGACY)
  vol = volume_lib.open_volume(stack.volume)
  results: dict[str, list[dict[str, Any]]] = {"supervised": [], "semi": []}
  for seed in stack.seeds:
    for variant in ("supervised", "semi"):
      start = time.perf_counter()
      directory = os.path.join(out, f"{variant}_s{seed}")
      r = fourway_run(directory, budget, stack, seed, semi if variant == "semi" else None)
      results[variant].append(r)
      log(
        f"{variant} seed {seed}: mIoU {r['plain']['mean_iou']:.4f}, with TTA "
        f"{r['tta']['mean_iou']:.4f} ({time.perf_counter() - start:.0f} s)"
      )
  rows = [
    _row(name, [r["tta" if tta else "plain"] for r in results[variant]], vol.classes)
    for name, variant, tta in ROWS
  ]
  ensembles = {}
  if len(stack.seeds) > 1:
    for variant in ("supervised", "semi"):
      directory = os.path.join(out, f"ensemble_{variant}")
      settings = runs.settings(
        budget,
        volume=stack.volume,
        members=[r["settings"] for r in results[variant]],
      )
      done = runs.cached(directory, settings)
      if done is None:
        os.makedirs(directory, exist_ok=True)
        members = [os.path.join(out, f"{variant}_s{seed}", "run") for seed in stack.seeds]
        done = {"settings": settings}
        done |= {
          "tta" if tta else "plain": _segment_and_score(
            members,
            os.path.join(directory, "seg_tta.zarr" if tta else "seg.zarr"),
            budget,
            vol,
            stack.eval_slices,
            tta=tta,
          )
          for tta in (False, True)
        }
        runs.write_result(directory, done)
      ensembles[variant] = {
        k: {"mean_iou": done[k]["mean_iou"], "per_class_iou": done[k]["per_class_iou"]}
        for k in ("plain", "tta")
      }
      log(
        f"{variant} ensemble of seeds {list(stack.seeds)}: mIoU {done['plain']['mean_iou']:.4f}, "
        f"with TTA {done['tta']['mean_iou']:.4f}"
      )
  seconds = {
    variant: {
      "train": float(np.mean([r["train_seconds"] for r in rs])),
      "segment": float(np.mean([r["plain"]["segment_seconds"] for r in rs])),
      "segment_tta": float(np.mean([r["tta"]["segment_seconds"] for r in rs])),
    }
    for variant, rs in results.items()
  }
  document = {
    **stack.describe(vol.classes, budget),
    "semi": dict(semi),
    "rows": rows,
    "ensembles": ensembles,
    "seconds": seconds,
  }
  runs.write_document(out, "fourway", document, fourway_markdown)
  return document


def _iou(value: float | None) -> str:
  return "-" if value is None else f"{value:.3f}"


def fourway_markdown(document: Mapping[str, Any]) -> str:
  """The four-way table: mean IoU mean +- std over seeds, and per class."""
  classes = document["classes"]
  head = "| | mean IoU | " + " | ".join(classes) + " |\n"
  head += "|---" * (len(classes) + 2) + "|\n"
  lines = []
  for row in document["rows"]:
    m = row["mean_iou"]
    spread = "(1 seed)" if m["std"] is None else f"+- {m['std']:.3f}"
    cells = [f"{m['mean']:.3f} {spread}"]
    cells += [_iou(row["per_class"][c]["mean"]) for c in classes]
    lines.append(f"| {row['name']} | " + " | ".join(cells) + " |")
  for variant, name in (("supervised", "supervised"), ("semi", "+ semi")):
    for key, suffix in (("plain", ""), ("tta", " + TTA")):
      if variant in document.get("ensembles", {}):
        e = document["ensembles"][variant][key]
        cells = [f"{e['mean_iou']:.3f} (one ensemble)"]
        cells += [_iou(e["per_class_iou"][c]) for c in classes]
        label = f"{name}{suffix}, ensemble of the {len(document['seeds'])} seeds"
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
  s = document["seconds"]
  note = (
    f"\nSeeds {document['seeds']}; train slices {document['train_slices']}, scored on "
    f"{document['eval_slices']}. Mean seconds: supervised training "
    f"{s['supervised']['train']:.0f}, semi-supervised {s['semi']['train']:.0f}; segmenting "
    f"the scored slices {s['supervised']['segment']:.1f}, with TTA "
    f"{s['supervised']['segment_tta']:.1f}.\n"
  )
  return head + "\n".join(lines) + "\n" + note


USAGE = r"""Does learning from the unannotated slices help? The four-way table and slice choice.

  fibseg study semi --out=semi/ [--budget=quick] [--seeds=0,1,2] [--suggest]
  fibseg study semi --out=semi_real/ --volume=vol.zarr --train_slices=4,8,12 \
    --eval_slices=16

For every seed, a U-Net trained on the annotated slices alone and one trained with the
semi-supervised objective (--semi_* flags, as --config.semi.*) on the same step budget;
each is scored on --eval_slices without and with test-time augmentation: rows
supervised / + semi / + TTA / + both, mean and std over seeds (fourway.json, .md).
--suggest also runs the slice test of `fibseg study ranking` on the same stack and seeds
(OUT/ranking/ranking.json, .md: the suggested, the entropy and a random fourth slice);
it needs labels on the candidate slices, which the default synthetic stack
(out/volume.zarr, every slice labelled; only training slices' labels are read in
training) has, and at least 2 seeds. Reruns resume; an
--out holds one setting (other --semi_*, --steps or slices are refused: use another
--out). The unlabelled patches come from every slice, the scored ones included (their
images, never their labels), as they would for a user segmenting the stack.
"""

OPTIONS = (
  Option("semi_weight", "float", 1.0, "--config.semi.weight of the semi rows."),
  Option("semi_mode", "string", "pseudo", "--config.semi.mode of the semi rows: pseudo or soft."),
  Option("semi_threshold", "float", 0.9, "--config.semi.threshold."),
  Option("semi_ema", "float", 0.99, "--config.semi.ema."),
  Option("suggest", "bool", False, "Also run the ranking study's slice test (OUT/ranking/)."),
)


def run(
  ctx: StudyContext,
  semi_weight: float = 1.0,
  semi_mode: str = "pseudo",
  semi_threshold: float = 0.9,
  semi_ema: float = 0.99,
  suggest: bool = False,
) -> dict[str, Any]:
  """`fibseg study semi`: the four-way table, and with `suggest` the slice test."""
  if semi_mode not in ("pseudo", "soft"):
    raise ValueError(f"--semi_mode={semi_mode}: expected pseudo or soft")
  runs.claim_study_directory(ctx.out, ctx.volume, kind=KIND, legacy=LEGACY)
  # Every slice labelled (only training slices' labels are read in training).
  stack = ctx.stack(annotate=range(ctx.budget.shape[0]))
  semi = {"weight": semi_weight, "mode": semi_mode, "threshold": semi_threshold, "ema": semi_ema}
  document = run_fourway(ctx.out, ctx.budget, stack, semi=semi, log=ctx.log)
  ctx.log(fourway_markdown(document))
  if suggest:  # the ranking study's experiment, on the same stack and seeds
    ranked = ranking.run_ranking(os.path.join(ctx.out, "ranking"), ctx.budget, stack, log=ctx.log)
    ctx.log(ranking.markdown(ranked))
  ctx.log(f"wrote {ctx.out}/fourway.json ({len(document['rows'])} rows)")
  return document
