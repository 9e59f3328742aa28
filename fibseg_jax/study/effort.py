"""The annotation-effort curve: held-out mean IoU against the pixels a user labels.

For every annotation level (`fibseg_jax.data.annotations.Level`: brush strokes over a
share of the training slices, whole slices, every Nth slice) and every seed, the stack's
truth is cut down to that level's labels and written as its own volume
(`sets/<level>[_s<seed>]/volume.zarr`, strokes drawn anew for every seed, as another
user would paint them), then a U-Net of the budget, the random forest on multiscale
features (the ilastik route) and the U-Net taught by that forest (`--config.distill
.teacher=forest`: the annotation plus the forest's probabilities over every slice) are
trained on it, and all are scored on the evaluation slices of the full truth. Every run
resumes (a directory with `result.json` is never redone).

x = labelled pixels, and the hours a person needs to paint them at a stated rate
(`HOURS_PER_MPIXEL`), y = mean IoU, mean +- std over seeds. Writes effort.json,
effort.md and effort.png.
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from fibseg_jax.data import annotations
from fibseg_jax.data import volume as volume_lib
from fibseg_jax.study import budget as budget_lib
from fibseg_jax.study import figures, runs
from fibseg_jax.study.context import OneStack, Option, StudyContext, seed_stats, stat_text
from fibseg_jax.train import distill

KIND = "effort study"
DEFAULT_LEVELS = (
  "strokes:0.005",
  "strokes:0.02",
  "slices:1",
  "slices:3",
  "slices:5",
  "every:4",
)
# A stated estimate, not a measurement: "days" for three whole 4000 x 4000 slices (48
# Mpixel) in the brief, say 24 working hours, is half an hour per Mpixel; brush strokes
# are taken at the same rate per pixel painted.
HOURS_PER_MPIXEL = 0.5
# The methods of the curve and their names in tables and figures.
METHODS = {
  "network": "U-Net",
  "forest": "random forest",
  "taught": "U-Net taught by the forest",
}


def _dirname(level: annotations.Level) -> str:
  return f"{level.kind}_{level.value:g}"


def annotation_set(
  out: str,
  truth: volume_lib.Volume,
  level: annotations.Level,
  *,
  seed: int,
  train_slices: Sequence[int],
  eval_slices: Sequence[int],
) -> tuple[str, list[int], int]:
  """Writes (or reuses) the volume of one level's annotation.

  Returns:
    (volume path, annotated slices, labelled pixels).
  """
  candidates = [z for z in truth.metadata.annotated_slices if z not in set(eval_slices)]
  missing = sorted(set(train_slices) - set(truth.metadata.annotated_slices))
  if missing:
    raise ValueError(f"{truth.root}: training slices {missing} carry no truth")
  chosen = level.slices(train_slices, candidates)
  name = _dirname(level) + (f"_s{seed}" if level.kind == "strokes" else "")
  directory = os.path.join(out, "sets", name)
  settings = {
    "level": level.name,
    "seed": int(seed) if level.kind == "strokes" else None,
    "slices": chosen,
    "truth": os.path.abspath(str(truth.root)),
  }
  done = runs.cached(directory, settings)
  path = os.path.join(directory, "volume.zarr")
  if done is None:
    labels = {z: level.labels(truth.read_labels(z), z, seed) for z in chosen}
    pixels = int(sum(int((v != annotations.IGNORE_LABEL).sum()) for v in labels.values()))
    os.makedirs(directory, exist_ok=True)
    annotations.write_annotated_volume(
      truth, path, labels, extra_attrs={"annotation": settings}, overwrite=True
    )
    done = runs.write_result(directory, {"settings": settings, "labelled_pixels": pixels})
  return path, chosen, int(done["labelled_pixels"])


def _forest(
  directory: str,
  budget: budget_lib.Budget,
  *,
  volume: str,
  truth: volume_lib.Volume,
  channels: Sequence[str],
  seed: int,
  eval_slices: Sequence[int],
  settings: dict[str, Any],
) -> dict[str, Any]:
  done = runs.cached(directory, settings)
  if done is not None:
    return done
  cell = runs.Cell(volume_lib.open_volume(volume), channels, seed, eval_slices, held_out=())
  result = runs.run_route(directory, budget, "forest", cell, truth_volume=truth)
  return runs.write_result(directory, {**result, "settings": settings})


def run_effort(
  out: str,
  budget: budget_lib.Budget,
  stack: OneStack,
  *,
  levels: Sequence[str] = DEFAULT_LEVELS,
  methods: Sequence[str] = tuple(METHODS),
  log=print,
) -> dict[str, Any]:
  """The effort curve over `levels` and `seeds`; writes out/effort.{json,md,png}.

  Args:
    out: the study directory.
    budget: the network's steps and widths, the tiling and the forest.
    volume: a volume with truth on the training, evaluation and candidate slices (the
      synthetic stack labelled everywhere, or a real stack's labelled slices); only the
      level's labels are ever trained on.
    channels, slices: the U-Net's input.
    seeds: training seeds (and stroke draws).
    train_slices: where strokes are painted; `slices:N` takes N of them while N fits.
    eval_slices: scored on, never annotated.
    levels: annotation levels (`annotations.Level.parse`).
    methods: of `METHODS`: "network", "forest", "taught" (the U-Net with the forest's
      probabilities as distillation teacher, weight 1).
  """
  runs.claim_study_directory(out, stack.volume, kind=KIND)
  parsed = [annotations.Level.parse(text) for text in levels]
  unknown = sorted(set(methods) - set(METHODS))
  if unknown or not methods:
    raise ValueError(f"--methods: unknown {unknown}; expected some of {', '.join(METHODS)}")
  truth = volume_lib.open_volume(stack.volume)
  lacking = sorted(set(stack.eval_slices) - set(truth.metadata.annotated_slices))
  if lacking:
    raise ValueError(f"{stack.volume}: evaluation slices {lacking} carry no truth")
  rows = []
  for level in parsed:
    results: dict[str, list[dict[str, Any]]] = {m: [] for m in methods}
    pixels = []
    for seed in stack.seeds:
      path, chosen, count = annotation_set(
        out, truth, level, seed=seed, train_slices=stack.train_slices, eval_slices=stack.eval_slices
      )
      pixels.append(count)
      common = dict(
        level=level.name,
        volume=os.path.abspath(path),
        channels=list(stack.channels),
        seed=int(seed),
        slices_annotated=chosen,
        eval_slices=[int(z) for z in stack.eval_slices],
      )
      for method in methods:
        start = time.perf_counter()
        directory = os.path.join(out, _dirname(level), f"{method}_s{seed}")
        if method in ("network", "taught"):
          taught = method == "taught"
          extra = {"teacher": distill.FOREST} if taught else {}
          settings = runs.settings(budget, slices=int(stack.slices), **common, **extra)
          r = runs.train_and_score(
            directory,
            budget,
            settings,
            dataclasses.replace(stack, volume=path, train_slices=chosen),
            seed,
            truth_volume=truth,
            configure=_forest_teacher if taught else None,
          )
        else:
          settings = runs.settings(budget, **common)
          r = _forest(
            directory,
            budget,
            volume=path,
            truth=truth,
            channels=stack.channels,
            seed=seed,
            eval_slices=stack.eval_slices,
            settings=settings,
          )
        results[method].append(r)
        log(
          f"{level.name} {method} seed {seed}: {count} labelled pixels, mIoU "
          f"{r['mean_iou']:.4f} ({time.perf_counter() - start:.0f} s)"
        )
    row = {
      "level": level.name,
      "slices": chosen,
      "labelled_pixels": float(np.mean(pixels)),
      "hours": float(np.mean(pixels)) / 1e6 * HOURS_PER_MPIXEL,
      "share": float(np.mean(pixels)) / (len(chosen) * truth.shape[1] * truth.shape[2]),
    }
    for method, rs in results.items():
      values = [r["mean_iou"] for r in rs]
      row[method] = {"mean_iou": seed_stats(values), "values": values}
    for method in ("network", "taught"):
      if method in results and "forest" in results:
        diff = [a - b for a, b in zip(row[method]["values"], row["forest"]["values"], strict=True)]
        row[f"{method}_minus_forest"] = seed_stats(diff)
    rows.append(row)
  document = {
    **stack.describe(truth.classes, budget),
    "hours_per_mpixel": HOURS_PER_MPIXEL,
    "methods": list(methods),
    "rows": rows,
  }
  runs.write_document(out, "effort", document, markdown)
  figures.effort_plot(document, os.path.join(out, "effort.png"))
  return document


def _forest_teacher(config) -> None:
  """The "taught" method: the forest fitted on the run's training pixels as teacher."""
  config.distill.teacher = distill.FOREST
  config.distill.weight = 1.0


def markdown(document: dict[str, Any]) -> str:
  """The curve as a table: one row per level."""
  methods = document["methods"]
  paired = [m for m in ("network", "taught") if m in methods and "forest" in methods]
  head = ["level", "slices", "labelled pixels", "share of those slices", "hours (est.)"]
  head += [f"{METHODS[m]} mean IoU" for m in methods]
  head += [f"{METHODS[m]} - forest (paired)" for m in paired]
  lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  for row in document["rows"]:
    cells = [
      row["level"],
      ",".join(map(str, row["slices"])),
      f"{row['labelled_pixels']:.0f}",
      f"{100 * row['share']:.2f}%",
      f"{row['hours']:.3f}",
    ]
    cells += [stat_text(row[m]["mean_iou"]) for m in methods]
    cells += [stat_text(row.get(f"{m}_minus_forest")) for m in paired]
    lines.append("| " + " | ".join(cells) + " |")
  note = (
    f"\nScored on slices {document['eval_slices']} of {document['volume']}; seeds "
    f"{document['seeds']} (mean +- std; strokes drawn anew per seed); budget "
    f"{document['budget']['name']}. Hours at a stated {document['hours_per_mpixel']} h per "
    "labelled Mpixel (an estimate, not a measurement).\n"
  )
  return "\n".join(lines) + "\n" + note


USAGE = r"""The annotation-effort curve: how much labelling buys how much accuracy.

  fibseg study effort --out=effort/ [--budget=quick] [--seeds=0,1,2]
  fibseg study effort --out=effort_real/ --volume=vol.zarr --train_slices=4,8,12 \
    --eval_slices=16 --levels=strokes:0.02,slices:1,slices:3

For every --levels entry and seed, the truth of --volume is cut down to what a user would
have painted: strokes:F (brush strokes, 3 pixels wide, along the middle of each class's
regions, over a share F of each training slice, drawn anew per seed), slices:N (N whole
slices, the training slices first) or every:N (every Nth slice with truth, whole). A
U-Net of the budget and the random forest on multiscale features are trained on it and
scored on --eval_slices of the full truth: effort.json, effort.md (mean +- std over seeds,
the paired U-Net - forest difference) and effort.png (mean IoU against labelled pixels).
Without --volume the budget's synthetic stack is generated in --out, labelled on every
slice (only the level's labels are ever trained on). Reruns resume.
"""

OPTIONS = (
  Option(
    "levels", "list", list(DEFAULT_LEVELS), "Annotation levels: strokes:F, slices:N, every:N."
  ),
  Option(
    "methods",
    "list",
    list(METHODS),
    "Of: network (the U-Net), forest (the random forest), taught (the U-Net taught by the "
    "forest: --config.distill.teacher=forest).",
  ),
)


def run(
  ctx: StudyContext, levels: Sequence[str] = DEFAULT_LEVELS, methods: Sequence[str] = tuple(METHODS)
) -> dict[str, Any]:
  """`fibseg study effort`: the curve on a stack labelled on every slice."""
  runs.claim_study_directory(ctx.out, ctx.volume, kind=KIND)
  stack = ctx.stack(annotate=range(ctx.budget.shape[0]))
  document = run_effort(ctx.out, ctx.budget, stack, levels=levels, methods=methods, log=ctx.log)
  ctx.log(open(os.path.join(ctx.out, "effort.md")).read())
  ctx.log(f"wrote {ctx.out}/effort.json, effort.md, effort.png ({len(document['rows'])} levels)")
  return document
