"""Distilling the seed ensemble into one fast network, measured with seeds.

Rows, each scored on the evaluation slices of a segmentation of the whole stack (so the
same run also gives the segmentation speed, Mpixel/s on this machine):

  supervised        the budget's U-Net (the shipped recipe), one per seed
  teacher           the supervised seeds as one ensemble, with test-time augmentation
                    (`teacher_tta`): what the students learn from; one row, no spread
  distilled         a U-Net of the same widths, trained on the labels of the training
                    area and on the teacher's probabilities over the whole stack
  distilled_narrow  the same at half the widths (about a quarter of the FLOPs)

The teacher's probabilities are computed once (`infer.distill.prepare_teacher`, into
`out/teacher/`), from images only: no evaluation label is read before scoring. Every
run is cached in `out/<row>_s<seed>/result.json` with the settings it was computed
with, so rerunning resumes; `out/distill.json` and `distill.md` are rewritten after
every run. Students pair with the supervised run of their seed (same split and batches).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from fibseg_jax import infer
from fibseg_jax.data import volume as volume_lib
from fibseg_jax.infer import distill as infer_distill
from fibseg_jax.study import budget as budget_lib
from fibseg_jax.study import context, runs

KIND = "distillation study"
ROWS = ("supervised", "teacher", "distilled", "distilled_narrow")


def narrow(features: Sequence[int]) -> tuple[int, ...]:
  """Half of every width (at least 2): about a quarter of a U-Net's FLOPs."""
  return tuple(max(2, int(f) // 2) for f in features)


def _segment_scored(
  model: str | Sequence[str],
  vol: volume_lib.Volume,
  directory: str,
  budget: budget_lib.Budget,
  eval_slices: Sequence[int],
) -> dict[str, Any]:
  scored, segmented = runs.segment_and_score(
    model, vol, os.path.join(directory, "seg.zarr"), budget, vol, eval_slices
  )
  return {
    **scored,
    "segment_seconds": segmented.seconds,
    "segment_mpixels": segmented.mpixels,
    "segment_mpx_per_s": segmented.mpixels_per_second,
  }


def run_distill_study(
  out: str,
  budget: budget_lib.Budget,
  stack: context.OneStack,
  *,
  teacher_tta: str = "all",
  row_names: Sequence[str] = ROWS,
  log: Callable[[str], None] = print,
) -> dict[str, Any]:
  """The four rows over `seeds`; writes out/distill.json and .md and returns the table.

  The teacher is the ensemble of the supervised runs of `seeds`, so those run first.
  """
  runs.claim_study_directory(out, stack.volume, kind=KIND)
  unknown = [r for r in row_names if r not in ROWS]
  if unknown:
    raise ValueError(f"--rows: unknown row(s) {unknown}; known: {', '.join(ROWS)}")
  vol = volume_lib.open_volume(stack.volume)
  common = dict(
    volume=stack.volume,
    channels=list(stack.channels),
    slices=int(stack.slices),
    train_slices=[int(z) for z in stack.train_slices],
    eval_slices=[int(z) for z in stack.eval_slices],
  )
  results: dict[str, list[dict[str, Any]]] = {name: [] for name in ROWS}
  document: dict[str, Any] = {}

  def record(name: str, result: dict[str, Any], started: float) -> None:
    nonlocal document
    results[name].append(result)
    log(
      f"{name} seed {result.get('seed', '-')}: mIoU {result['mean_iou']:.4f}, "
      f"{result['segment_mpx_per_s']:.3f} Mpx/s ({time.perf_counter() - started:.0f} s)"
    )
    document = {
      **common,
      "classes": list(vol.classes),
      "seeds": [int(s) for s in stack.seeds],
      "budget": budget.to_json(),
      "teacher_tta": teacher_tta,
      "narrow_features": list(narrow(budget.unet_features)),
      "rows": [
        summarise(n, rs, results["supervised"], vol.classes) for n, rs in results.items() if rs
      ],
    }
    runs.write_document(out, "distill", document, markdown)

  def student(name: str, seed: int, teacher_array: str | None, features=None) -> None:
    started = time.perf_counter()
    directory = os.path.join(out, f"{name}_s{seed}")
    settings = runs.settings(budget, seed=int(seed), row=name, teacher_tta=teacher_tta, **common)
    done = runs.cached(directory, settings)
    if done is None:

      def configure(config):
        if teacher_array:
          config.distill.teacher = teacher_array
        if features is not None:
          config.model.features = tuple(features)

      workdir, seconds = runs.train_unet(directory, budget, stack, seed, configure)
      done = runs.write_result(
        directory,
        {
          "settings": settings,
          "seed": int(seed),
          "train_seconds": seconds,
          **_segment_scored(workdir, vol, directory, budget, stack.eval_slices),
        },
      )
    record(name, done, started)

  for seed in stack.seeds:
    student("supervised", seed, None)
  members = [os.path.join(out, f"supervised_s{s}", "run") for s in stack.seeds]
  teacher_array = None
  if {"teacher", "distilled", "distilled_narrow"} & set(row_names):
    started = time.perf_counter()
    teacher_dir = os.path.join(out, "teacher")
    config = runs.network_config(
      budget,
      architecture="unet",
      channels=stack.channels,
      slices=stack.slices,
      seed=0,
      volume=stack.volume,
      held_out=stack.eval_slices,
    )
    config.distill.teacher = ",".join(members)
    config.distill.tta = teacher_tta
    settings = runs.settings(budget, row="teacher", teacher_tta=teacher_tta, **common)
    done = runs.cached(teacher_dir, settings)
    teacher_array = infer_distill.prepare_teacher(
      config,
      teacher_dir,
      settings=runs.segment_settings(budget),
      progress=False,
    )
    if done is None:
      seconds = time.perf_counter() - started
      labels = infer.open_array(os.path.join(teacher_dir, "teacher", "labels.zarr"))
      predictions = {int(z): labels[int(z)].read().result() for z in stack.eval_slices}
      mpixels = float(np.prod(vol.shape)) / 1e6
      done = {
        "settings": settings,
        "members": members,
        **runs.score(runs.read_truths(vol, stack.eval_slices), predictions, vol.classes),
        "segment_seconds": seconds,
        "segment_mpixels": mpixels,
        "segment_mpx_per_s": mpixels / seconds,
      }
      runs.write_result(teacher_dir, done)
    if "teacher" in row_names:
      record("teacher", done, started)
  for seed in stack.seeds:
    if "distilled" in row_names:
      student("distilled", seed, teacher_array)
    if "distilled_narrow" in row_names:
      student("distilled_narrow", seed, teacher_array, narrow(budget.unet_features))
  return document


def summarise(name: str, results, supervised, classes) -> dict[str, Any]:
  """One row: mean IoU and speed over seeds, the paired difference to supervised."""
  paired = context.paired_differences(results, supervised) if name != "supervised" else []
  return {
    "name": name,
    "seeds": [r.get("seed") for r in results],
    "mean_iou": context.seed_stats([r["mean_iou"] for r in results]),
    "values": [r["mean_iou"] for r in results],
    "per_class": {c: context.seed_stats([r["per_class_iou"][c] for r in results]) for c in classes},
    "paired_difference": context.seed_stats(paired) if paired else None,
    "segment_mpx_per_s": context.seed_stats([r["segment_mpx_per_s"] for r in results]),
    "train_seconds": context.seed_stats([r.get("train_seconds") for r in results]),
  }


def markdown(document) -> str:
  """The table: mean IoU, paired difference to supervised, per class, Mpixel/s."""
  classes = document["classes"]
  b = document["budget"]
  head = ["row", "mean IoU", "paired diff. (to supervised)", *classes, "segment Mpx/s"]
  lines = [
    f"Distillation on {document['volume']}: U-Net {context.stack_text(document)}; budget "
    f"{b['name']} ({context.steps_text(b)}, widths "
    f"{b['unet_features']}; narrow {document['narrow_features']}); "
    f"teacher = the supervised seeds {document['seeds']} as an ensemble with TTA "
    f"{document['teacher_tta']}; students without TTA. Speed: the whole stack segmented, "
    "budget tiling, this machine.",
    "",
  ]
  cells = [
    [
      row["name"],
      context.stat_text(row["mean_iou"]),
      "-" if row["paired_difference"] is None else context.stat_text(row["paired_difference"]),
      *(context.stat_text(row["per_class"][c]).split(" +- ")[0] for c in classes),
      context.stat_text(row["segment_mpx_per_s"], 2),
    ]
    for row in document["rows"]
  ]
  return "\n".join(lines + context.markdown_table(head, cells)) + "\n"


USAGE = r"""Distil the seed ensemble into one fast network, measured (`fibseg_jax.study.distill`).

  fibseg study distill --out=distill/ [--budget=quick] [--seeds=0,1,2]
  fibseg study distill --out=distill_real/ --volume=vol.zarr --train_slices=4,8,12 \
    --eval_slices=16 [--teacher_tta=off]

Rows: supervised (the budget's U-Net, one per seed), teacher (those seeds as an
ensemble, with --teacher_tta test-time augmentation), distilled (a U-Net of the same
widths trained on the labels and the teacher's probabilities over the whole stack) and
distilled_narrow (half the widths). Each is scored on --eval_slices of a segmentation of
the whole stack, which also gives its Mpixel/s on this machine; mean +- std over seeds
and the paired difference to supervised. Writes distill.json and distill.md; reruns
resume, and an --out holds one setting. Default volume: the budget's synthetic stack in
OUT/volume.zarr.
"""

OPTIONS = (
  context.Option(
    "teacher_tta", "string", "all", "Test-time augmentation of the teacher (segment --tta)."
  ),
)


def run(ctx: context.StudyContext, teacher_tta: str = "all") -> dict[str, Any]:
  """`fibseg study distill`: the rows of `ROWS` (or ctx.rows) with seeds."""
  runs.claim_study_directory(ctx.out, ctx.volume, kind=KIND)
  document = run_distill_study(
    ctx.out,
    ctx.budget,
    ctx.stack(),
    teacher_tta=teacher_tta,
    row_names=ctx.rows or ROWS,
    log=ctx.log,
  )
  ctx.log(open(os.path.join(ctx.out, "distill.md")).read())
  ctx.log(f"wrote {ctx.out}/distill.json")
  return document
