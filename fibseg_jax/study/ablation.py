"""The training recipe, measured part by part: an ablation with seeds.

Every row trains the same U-Net (the budget's widths, slab depth, step budget and
patches) on the same annotated slices and validation split, and scores the evaluation
slices without test-time augmentation, so the rows differ only in the recipe:

  baseline      the first recipe: flips, quarter turns, slab reversal, gain/offset/gamma,
                cross-entropy + Dice, patches drawn by labelled area, AdamW + cosine
  full          the baseline with every part of `FULL` on
  +lr_3x        the baseline at 3x the learning rate (the first part of `PRIORITY`)
  full+lr_3x    full at that learning rate
  lr_3x+<part>  +lr_3x with one more part of `PARTS` on
  +sgd_poly     nnU-Net's optimizer and schedule instead of the baseline's

Each run lives in `out/<row>_s<seed>/` and a finished one (its `result.json`, with the
settings it was computed with) is never recomputed, so rerunning resumes;
`out/ablation.json` and `ablation.md` are rewritten after every run. The paired
difference to the row a row adds its part to (same seed, so the same split and initial
draw of batches) is reported per seed and as mean +- std.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from fibseg_jax import outputs
from fibseg_jax.data import loader as loader_lib
from fibseg_jax.data import volume as volume_lib
from fibseg_jax.study import budget as budget_lib
from fibseg_jax.study import context, figures, runs

# The parts of the recipe, as config overrides of the baseline (`train.config.FIELDS`
# documents each field): the loader's `RECIPE_PARTS` and the training parts.
PARTS: Mapping[str, Mapping[str, Any]] = {
  **{
    part: {f"data.{field}": value for field, value in fields.items()}
    for part, fields in loader_lib.RECIPE_PARTS.items()
  },
  # The MONAI peer's training differs from the baseline's in these (it trains at a
  # constant 1e-3, with unweighted cross-entropy, and PyTorch's smaller initial weights,
  # so larger relative steps under Adam).
  "lr_3x": {"train.learning_rate": 3e-3},
  "constant_lr": {"train.schedule": "constant"},
  "no_class_weights": {"train.class_weights": False},
  "deep_supervision": {"train.deep_supervision": True},
  "sgd_poly": {
    "train.optimizer": "sgd",
    "train.schedule": "poly",
    "train.learning_rate": 0.01,
    "train.weight_decay": 3e-5,
  },
}
# The parts of the `full` row: every augmentation and sampling part; the optimizer is an
# alternative to the baseline's, measured on its own row.
FULL = ("spatial", "intensity", "artifacts", "deep_supervision", "rare_class")
# The order the single-part rows run in: what the first measurements made most likely to
# matter first, so a partial run has measured it.
PRIORITY = (
  "lr_3x",
  "deep_supervision",
  "rare_class",
  "artifacts",
  "constant_lr",
  "no_class_weights",
)
# Everything the parts set to something else, at its baseline value.
BASELINE: Mapping[str, Any] = {
  "data.rotation": 0.0,
  "data.scale": 0.0,
  "data.elastic": 0.0,
  "data.noise": 0.0,
  "data.blur": 0.0,
  "data.contrast": 0.0,
  "data.lowres": 0.0,
  "data.invert_gamma": 0.0,
  "data.curtain": 0.0,
  "data.shading": 0.0,
  "data.charging": 0.0,
  "data.drift": 0.0,
  "data.rare_fraction": 0.0,
  "train.deep_supervision": False,
  "train.class_weights": True,
  "train.optimizer": "adamw",
  "train.schedule": "cosine",
  "train.learning_rate": 1e-3,
  "train.weight_decay": 1e-4,
}

KIND = "recipe ablation"


def rows(names: Sequence[str] | None = None) -> dict[str, dict[str, Any]]:
  """{row name: its config overrides}: baseline, full, then + each part.

  Args:
    names: rows to keep (e.g. ("baseline", "full")), in this function's order; None: all.

  Raises:
    ValueError: an unknown row name, listing the known ones.
  """
  table = {"baseline": dict(BASELINE)}
  table["full"] = {**BASELINE, **{k: v for p in FULL for k, v in PARTS[p].items()}}
  # The first part of PRIORITY alone, then as the new reference: the full recipe and each
  # other part on top of it (whether they help once the step size is the better one),
  # then the other parts alone on the baseline.
  first = PRIORITY[0]
  base = table[f"+{first}"] = {**BASELINE, **PARTS[first]}
  table[f"full+{first}"] = {**table["full"], **PARTS[first]}
  others = [p for p in PRIORITY[1:] if p in PARTS] + [p for p in PARTS if p not in PRIORITY]
  table |= {f"{first}+{part}": {**base, **PARTS[part]} for part in others if part != "sgd_poly"}
  table["+sgd_poly"] = {**BASELINE, **PARTS["sgd_poly"]}
  if names is None:
    return table
  unknown = [n for n in names if n not in table]
  if unknown:
    raise ValueError(f"--rows: unknown row(s) {unknown}; known: {', '.join(table)}")
  return {n: v for n, v in table.items() if n in names}


def reference(name: str) -> str:
  """The row a row's paired difference is taken against: the row it adds one part to."""
  first = PRIORITY[0]
  return f"+{first}" if name.startswith((f"{first}+", f"full+{first}")) else "baseline"


def run_one(
  directory: str,
  budget: budget_lib.Budget,
  overrides: Mapping[str, Any],
  stack: context.OneStack,
  seed: int,
) -> dict[str, Any]:
  """Trains one row's U-Net for one seed and scores the evaluation slices (cached)."""
  settings = runs.cell_settings(budget, stack, seed, overrides=dict(overrides))
  return runs.train_and_score(
    directory,
    budget,
    settings,
    stack,
    seed,
    configure=lambda config: runs.set_fields(config, overrides),
  )


def summarise(
  name: str, results: Sequence[dict[str, Any]], baseline: Sequence[dict[str, Any]], classes
) -> dict[str, Any]:
  """One row of the table: mean IoU and per class over seeds, and the paired difference
  to the reference row's run of the same seed (`reference`)."""
  paired = context.paired_differences(results, baseline)
  return {
    "name": name,
    "reference": reference(name),
    "seeds": [r["seed"] for r in results],
    "mean_iou": context.seed_stats([r["mean_iou"] for r in results]),
    "values": [r["mean_iou"] for r in results],
    "per_class": {c: context.seed_stats([r["per_class_iou"][c] for r in results]) for c in classes},
    "paired_difference": context.seed_stats(paired) if paired else None,
    "paired_values": paired,
    "train_seconds": float(np.mean([r["train_seconds"] for r in results])),
  }


def run_ablation(
  out: str,
  budget: budget_lib.Budget,
  stack: context.OneStack,
  *,
  row_names: Sequence[str] | None = None,
  finished_only: bool = False,
  log: Callable[[str], None] = print,
) -> dict[str, Any]:
  """The ablation table over `seeds`; writes out/ablation.json and .md and returns it.

  Rows run in `rows()` order, every seed of a row before the next row, so a partial run
  already compares the first rows with their spread. `finished_only` trains nothing: the
  table is rewritten from the runs already finished (rows without any are left out).
  """
  runs.claim_study_directory(out, stack.volume, kind=KIND)
  vol = volume_lib.open_volume(stack.volume)
  table = rows(row_names)
  results: dict[str, list[dict[str, Any]]] = {}
  document: dict[str, Any] = {}
  for name, overrides in table.items():
    results[name] = []
    for seed in stack.seeds:
      start = time.perf_counter()
      directory = os.path.join(out, f"{name.lstrip('+')}_s{seed}")
      if finished_only and runs.read_result(directory) is None:
        continue
      r = run_one(directory, budget, overrides, stack, seed)
      results[name].append(r)
      log(f"{name} seed {seed}: mIoU {r['mean_iou']:.4f} ({time.perf_counter() - start:.0f} s)")
      document = {
        **stack.describe(vol.classes, budget),
        "parts": {k: dict(v) for k, v in PARTS.items()},
        "full": list(FULL),
        "rows": [
          summarise(n, rs, results.get(reference(n), []), vol.classes)
          for n, rs in results.items()
          if rs
        ],
      }
      runs.write_document(out, "ablation", document, markdown)
  return document


def markdown(document: Mapping[str, Any]) -> str:
  """The ablation table: mean IoU and paired difference (mean +- std over seeds), per class."""
  classes = document["classes"]
  head = ["row", "mean IoU", "paired diff. (to)", *classes, "train s"]
  lines = [
    f"Recipe ablation on {document['volume']}: U-Net, {context.stack_text(document)} (no "
    f"TTA); budget {document['budget']['name']} "
    f"({context.steps_text(document['budget'])}); seeds {document['seeds']}.",
    "",
  ]
  cells = []
  for row in document["rows"]:
    diff = row["paired_difference"] if row["name"] != "baseline" else None
    to = row.get("reference", "baseline")
    cells.append(
      [
        row["name"],
        context.stat_text(row["mean_iou"]),
        "-" if diff is None else f"{context.stat_text(diff)} ({to})",
        *(context.stat_text(row["per_class"][c], 3).split(" +- ")[0] for c in classes),
        f"{row['train_seconds']:.0f}",
      ]
    )
  return "\n".join(lines + context.markdown_table(head, cells)) + "\n"


def read_document(path: str) -> dict[str, Any]:
  """An ablation's table: `path` is its --out folder or its ablation.json.

  Raises:
    ValueError: no finished ablation there, naming the path.
  """
  json_file = path.endswith(".json") and not os.path.isdir(path)
  file = path if json_file else os.path.join(path, "ablation.json")
  try:
    with open(file) as f:
      return json.load(f)
  except (OSError, json.JSONDecodeError) as e:
    raise ValueError(f"--compare: {file} is not a finished ablation's table ({e})") from None


def compare_budgets(
  documents: Sequence[Mapping[str, Any]], row_names: Sequence[str] | None = None
) -> dict[str, Any]:
  """The same rows at several step budgets: mean IoU and per class against steps.

  Args:
    documents: ablation tables (`run_ablation`) of one stack, slices and classes that
      differ in their step budget.
    row_names: only these rows; None: every row of any document.

  Returns:
    {"volume", "classes", "eval_slices", "steps": [sorted budgets],
     "rows": {row name: [{"steps", "seeds", "mean_iou", "per_class"}, ...]}} with a point
    for each budget a row ran at.

  Raises:
    ValueError: documents of other stacks, slices or classes, or two of one budget.
  """
  if not documents:
    raise ValueError("--compare: give the --out folders of at least one finished ablation")
  first = documents[0]
  same = ("volume", "classes", "channels", "slices", "train_slices", "eval_slices")
  for doc in documents[1:]:
    for key in same:
      if doc[key] != first[key]:
        raise ValueError(
          f"--compare: the ablations differ in {key} ({first[key]} vs {doc[key]}); only "
          "the step budget may differ"
        )
  steps = [int(doc["budget"]["steps"]) for doc in documents]
  if len(set(steps)) != len(steps):
    raise ValueError(f"--compare: two ablations of the same step budget ({sorted(steps)})")
  rows: dict[str, list[dict[str, Any]]] = {}
  for doc in sorted(documents, key=lambda d: int(d["budget"]["steps"])):
    for row in doc["rows"]:
      if row_names is not None and row["name"] not in row_names:
        continue
      rows.setdefault(row["name"], []).append(
        {
          "steps": int(doc["budget"]["steps"]),
          "seeds": row["seeds"],
          "mean_iou": row["mean_iou"],
          "per_class": row["per_class"],
        }
      )
  return {
    "volume": first["volume"],
    "classes": list(first["classes"]),
    "eval_slices": first["eval_slices"],
    "batch_size": first["budget"]["batch_size"],
    "patch": first["budget"]["patch"],
    "steps": sorted(steps),
    "rows": rows,
  }


def budgets_markdown(document: Mapping[str, Any]) -> str:
  """`compare_budgets` as a table: a line per (row, budget), mean +- std over seeds."""
  classes = document["classes"]
  head = ["row", "steps", "seeds", "mean IoU", *classes]
  lines = [
    f"Recipe rows against the step budget on {document['volume']} (batch "
    f"{document['batch_size']} x {document['patch']}^2), scored on "
    f"{document['eval_slices']} without TTA; mean +- std over seeds.",
    "",
  ]
  cells = [
    [name, str(p["steps"]), str(len(p["seeds"])), context.stat_text(p["mean_iou"])]
    + [context.stat_text(p["per_class"][c]).split(" +- ")[0] for c in classes]
    for name, points in document["rows"].items()
    for p in points
  ]
  return "\n".join(lines + context.markdown_table(head, cells)) + "\n"


def parts(names: Sequence[str]) -> dict[str, Any]:
  """The config overrides that switch on the recipe parts `names` (keys of `PARTS`).

  Raises:
    ValueError: an unknown part, listing the known ones.
  """
  unknown = [n for n in names if n not in PARTS]
  if unknown:
    raise ValueError(f"--recipe: unknown part(s) {unknown}; known: {', '.join(PARTS)}")
  return {k: v for n in names for k, v in PARTS[n].items()}


USAGE = r"""The training recipe, part by part, with seeds (`fibseg_jax.study.ablation`).

  fibseg study ablation --out=ablation/ [--budget=quick] [--seeds=0,1,2]
  fibseg study ablation --out=ablation_real/ --volume=vol.zarr --train_slices=4,8,12 \
    --eval_slices=16 [--rows=baseline,full] [--steps=1000]
  fibseg study ablation --out=budgets/ --compare=ablation_real/,ablation_real_1000/

--compare trains nothing: finished ablations of one stack at other --steps, side by side
(budgets.json, budgets.md and budgets.png in --out: mean IoU and each class against the
step budget), to see where accuracy stops rising.

Rows: the baseline (the first recipe), full (every augmentation and sampling part on)
and + each part alone (spatial, intensity, artifacts, deep_supervision, rare_class,
sgd_poly). Every row is the same U-Net on the same slices, split and step budget, scored
on --eval_slices without test-time augmentation; mean +- std over seeds and the paired
difference to the baseline of the same seed. Writes ablation.json and ablation.md;
rerunning resumes (finished runs are kept), and an --out holds one setting (other
--steps, slices or volume are refused: use another --out). Default volume: the
synthetic stack of the budget, generated in OUT/volume.zarr.
"""

BUDGETS_KIND = "ablation budgets"
OPTIONS = (
  context.Option(
    "finished_only", "bool", False, "Train nothing: rewrite the table from finished runs."
  ),
  context.Option(
    "compare",
    "list",
    None,
    "Train nothing: these finished ablations (--out folders or ablation.json) of one stack "
    "at other --steps, against the step budget, into --out (with --rows: only those rows).",
  ),
)


def write_budgets(ctx: context.StudyContext, paths: Sequence[str]) -> dict[str, Any]:
  """--compare: the budgets table and figure of finished ablations, written to ctx.out."""
  document = compare_budgets([read_document(p) for p in paths], ctx.rows)
  try:  # a new folder, or this command's earlier one; never inside a compared ablation
    outputs.claim(
      ctx.out, kind=BUDGETS_KIND, flag="--out", inputs={"--compare": paths}, directory=True
    )
  except outputs.OutputError as e:
    raise ValueError(str(e)) from e
  runs.write_json(os.path.join(ctx.out, "budgets.json"), document)
  table = ctx.write_text("budgets.md", budgets_markdown(document))
  figures.budget_plot(document, os.path.join(ctx.out, "budgets.png"))
  ctx.log(open(table).read())
  ctx.log(f"wrote {ctx.out}/budgets.json, budgets.md and budgets.png")
  return document


def run(
  ctx: context.StudyContext, finished_only: bool = False, compare: Sequence[str] | None = None
) -> dict[str, Any]:
  """`fibseg study ablation`: the recipe's rows with seeds, or (`compare`) the budgets."""
  if compare:
    return write_budgets(ctx, compare)
  runs.claim_study_directory(ctx.out, ctx.volume, kind=KIND)
  document = run_ablation(
    ctx.out,
    ctx.budget,
    ctx.stack(),
    row_names=ctx.rows,
    finished_only=finished_only,
    log=ctx.log,
  )
  ctx.log(markdown(document))
  ctx.log(f"wrote {ctx.out}/ablation.json ({len(document['rows'])} rows)")
  return document
