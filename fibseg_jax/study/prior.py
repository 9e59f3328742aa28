"""The prior against the forest: held-out mean IoU from strokes or whole slices, with seeds.

For every stack, annotation level (`fibseg_jax.data.annotations.Level`: `strokes:0.02`
paints brush strokes over 2% of each training slice, `slices:3` labels three whole
ones) and seed, the level's labels are drawn from the truth of the training slices (new
strokes for every seed, as another user would paint them), a random forest is fitted on
them (the forest route, all painted pixels: `enhance.fit_forest`), and the evaluation
slices are segmented by the forest and by the shipped prior applied to that forest
(`fibseg_jax.infer.enhance`). The evaluation slices' labels are read only to score.
Both rows share the forest, so their difference is paired; wall times are those of this
machine.

  fibseg study prior --out=prior/ [--levels=strokes:0.02,slices:3] [--seeds=0,1,2]
  fibseg study prior --out=prior/ --stacks=synthetic,drosophila_vnc,sbem_mito,flyem_medulla

Writes OUT/<level>_s<seed>/result.json and forest.npz (a finished cell is never redone),
OUT/prior.json and OUT/prior.md; over --stacks, each stack's into OUT/<stack>/ and the
rows of every stack in OUT/prior.json and prior.md (`combine`), the table of
experiments/results/prior.{json,md}.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from fibseg_jax.data import annotations
from fibseg_jax.data import volume as volume_lib
from fibseg_jax.eval import metrics
from fibseg_jax.infer import enhance
from fibseg_jax.study import context, runs

DEFAULT_LEVELS = ("strokes:0.005", "strokes:0.02", "slices:1", "slices:3")


@dataclasses.dataclass(frozen=True)
class Stack:
  """A stack to measure on: images, the truth of its training and evaluation slices.

  Attributes:
    name: its name in tables.
    images: {z: raw slice [y, x, C]} of the training and evaluation slices.
    truth: {z: labels [y, x] uint8} of the same slices.
    classes: class names.
    train_slices, eval_slices: z.
  """

  name: str
  images: dict[int, np.ndarray]
  truth: dict[int, np.ndarray]
  classes: tuple[str, ...]
  train_slices: tuple[int, ...]
  eval_slices: tuple[int, ...]


def volume_stack(
  name: str, path: str, train: Sequence[int], evaluate: Sequence[int], channels=None
) -> Stack:
  """A stack from a volume whose training and evaluation slices are annotated."""
  vol = volume_lib.open_volume(path)
  missing = sorted((set(train) | set(evaluate)) - set(vol.metadata.annotated_slices))
  if missing:
    raise ValueError(f"{path}: slices {missing} carry no labels")
  index = vol.channel_indices(channels or vol.channels)
  zs = (*train, *evaluate)
  return Stack(
    name,
    {z: vol.read_image(z)[..., index] for z in zs},
    {z: vol.read_labels(z) for z in zs},
    vol.classes,
    tuple(train),
    tuple(evaluate),
  )


def mean_iou(truth: dict[int, np.ndarray], predicted: dict[int, np.ndarray], k: int) -> float:
  confusion = sum(metrics.confusion_matrix(truth[z], predicted[z], k) for z in sorted(truth))
  return float(metrics.metrics_from_confusion(confusion).mean_iou)


def forest_cell(stack: Stack, level: annotations.Level, seed: int, path: str) -> dict[str, Any]:
  """The forest of one cell, fitted once and kept in `path` (npz): its probabilities and
  the normalised images of the evaluation slices, which is all the prior needs."""
  if os.path.isfile(path):
    with np.load(path) as f:
      zs = [int(z) for z in f["slices"]]
      return {
        "image": {z: f[f"image_{z}"].astype(np.float32) for z in zs},
        "probabilities": {z: f[f"probs_{z}"].astype(np.float32) / 255 for z in zs},
        "painted_pixels": int(f["painted_pixels"]),
        "chosen": [int(z) for z in f["chosen"]],
        "seconds": json.loads(str(f["seconds"])),
      }
  chosen = level.slices(stack.train_slices, stack.train_slices)
  painted = [level.labels(stack.truth[z], z, seed) for z in chosen]
  images = [stack.images[z] for z in chosen]
  route, fit_seconds = enhance.fit_forest(images, painted, len(stack.classes), seed=seed)
  seconds = {"fit": fit_seconds}
  start = time.perf_counter()
  probs = {z: route.probabilities(stack.images[z]) for z in stack.eval_slices}
  seconds["forest"] = time.perf_counter() - start
  image = {z: route.normalised(stack.images[z]) for z in stack.eval_slices}
  out = {
    "image": image,
    "probabilities": probs,
    "painted_pixels": int(sum(int((p != annotations.IGNORE_LABEL).sum()) for p in painted)),
    "chosen": list(chosen),
    "seconds": seconds,
  }
  os.makedirs(os.path.dirname(path), exist_ok=True)
  arrays = {f"image_{z}": v.astype(np.float16) for z, v in image.items()}
  arrays.update({f"probs_{z}": np.rint(v * 255).astype(np.uint8) for z, v in probs.items()})
  np.savez(
    f"{path}.partial.npz",
    slices=np.array(stack.eval_slices),
    chosen=np.array(chosen),
    painted_pixels=out["painted_pixels"],
    seconds=np.array(json.dumps(seconds)),
    **arrays,
  )
  os.replace(f"{path}.partial.npz", path)
  return out


def run_cell(
  stack: Stack, level: annotations.Level, seed: int, prior: enhance.Prior | None, directory: str
) -> dict[str, Any]:
  """One stack, level and seed: the forest's and the prior's held-out mean IoU (the
  forest alone when `prior` is None)."""
  fitted = forest_cell(stack, level, seed, os.path.join(directory, "forest.npz"))
  truth = {z: stack.truth[z] for z in stack.eval_slices}
  k = len(stack.classes)
  forest_labels = {z: p.argmax(-1) for z, p in fitted["probabilities"].items()}
  result = {
    "stack": stack.name,
    "level": level.name,
    "seed": int(seed),
    "slices": fitted["chosen"],
    "painted_pixels": fitted["painted_pixels"],
    "forest": mean_iou(truth, forest_labels, k),
    "seconds": {k_: round(v, 2) for k_, v in fitted["seconds"].items()},
  }
  if prior is None:
    return result
  start = time.perf_counter()
  labels = {
    z: enhance.enhance(prior, fitted["image"][z], p).argmax(-1)
    for z, p in fitted["probabilities"].items()
  }
  result["seconds"]["enhance"] = round(time.perf_counter() - start, 2)
  result["prior"] = mean_iou(truth, labels, k)
  return result


def _stat(values: Sequence[float]) -> dict[str, float]:
  v = np.asarray(values, np.float64)
  return {"mean": float(v.mean()), "std": float(v.std(ddof=1)) if len(v) > 1 else 0.0, "n": len(v)}


def stack_cells(
  out: str,
  source: Stack | Callable[[], Stack],
  name: str,
  levels: Sequence[str],
  seeds: Sequence[int],
  prior: enhance.Prior | None,
  log: Callable[[str], None] = print,
) -> list[dict[str, Any]]:
  """Every cell of one stack, each cached in `out`/<level>_s<seed>/result.json.

  Args:
    out: the stack's folder.
    source: the `Stack`, or a callable returning it (loaded only when a cell needs it).
    name: its name in tables.
    levels: annotation levels.
    seeds: seeds of the strokes and of the forest.
    prior: the prior; None fits and keeps the forests only (to run ahead of a prior).
    log: where progress lines go.

  Returns:
    The finished cells (none without a prior).
  """
  stack = source if isinstance(source, Stack) else None
  cells = []
  for text in levels:
    level = annotations.Level.parse(text)
    for seed in seeds:
      directory = os.path.join(out, f"{level.kind}_{level.value:g}_s{seed}")
      path = os.path.join(directory, "result.json")
      if os.path.isfile(path):
        with open(path) as f:
          cells.append(json.load(f))
        continue
      stack = stack or source()
      cell = run_cell(stack, level, seed, prior, directory)
      log(f"prior study: {name} {level.name} seed {seed}: {cell}")
      if prior is None:
        continue
      with open(f"{path}.partial", "w") as f:
        json.dump(cell, f, indent=1)
      os.replace(f"{path}.partial", path)
      cells.append(cell)
  return cells


def stack_rows(name: str, cells: Sequence[dict[str, Any]], levels: Sequence[str]) -> list[dict]:
  """The table's rows of one stack: per level, both rows and their paired difference."""
  rows = []
  for text in levels:
    mine = [c for c in cells if c["level"] == annotations.Level.parse(text).name]
    forest, enhanced = [c["forest"] for c in mine], [c["prior"] for c in mine]
    rows.append(
      {
        "stack": name,
        "level": text,
        "forest": _stat(forest),
        "prior": _stat(enhanced),
        "prior_minus_forest": _stat([a - b for a, b in zip(enhanced, forest, strict=True)]),
        "seconds": {
          k: round(float(np.mean([c["seconds"][k] for c in mine])), 1)
          for k in ("fit", "forest", "enhance")
        },
        "seeds": [c["seed"] for c in mine],
      }
    )
  return rows


def write_table(out: str, sha256: str | None, rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
  """Writes `out`/prior.json and prior.md (the prior's checksum and the rows)."""
  document = {"prior": sha256, "rows": list(rows)}
  with open(os.path.join(out, "prior.json"), "w") as f:
    json.dump(document, f, indent=1)
  with open(os.path.join(out, "prior.md"), "w") as f:
    f.write(markdown(document))
  return document


KIND = "prior study"
# The first prior study (experiments/prior_study.py) wrote its folders without markers:
# the top one holds prior.json, each stack's one its cells.
SUITE_LEGACY = ("prior.json",)


def _legacy(levels: Sequence[str], seeds: Sequence[int]) -> tuple[str, ...]:
  parsed = [annotations.Level.parse(text) for text in levels]
  return tuple(f"{level.kind}_{level.value:g}_s{seed}" for level in parsed for seed in seeds)


USAGE = r"""The shipped prior against the random forest, from strokes and whole slices, with seeds.

  fibseg study prior --out=prior/ [--levels=strokes:0.005,strokes:0.02,slices:3]
  fibseg study prior --out=prior_real/ --volume=vol.zarr --train_slices=4,8,12 \
    --eval_slices=16
  fibseg study prior --out=prior_suite/ --stacks=synthetic,drosophila_vnc,sbem_mito,flyem_medulla

For every annotation level and seed (default 0,1,2): strokes over a share of each
training slice (strokes:F) or whole slices (slices:N) drawn from the truth, a random
forest fitted on them, the evaluation slices segmented by the forest and by the prior
applied to it (paired; fit, forest and prior seconds). No network is trained: --steps
and --config.* do not apply. Writes prior.json and prior.md; over --stacks, each stack's
into OUT/<stack>/ and all their rows in OUT/prior.json and prior.md. Reruns resume.
"""

OPTIONS = (
  context.Option(
    "levels", "list", list(DEFAULT_LEVELS), "Annotation levels (strokes:F, slices:N)."
  ),
  context.Option(
    "prior", "string", enhance.PRIOR_DIR, "Folder of prior.msgpack/json; none: forests only."
  ),
)


def _load_prior(prior: str) -> enhance.Prior | None:
  return None if prior == "none" else enhance.load_prior(prior)


def run(
  ctx: context.StudyContext, levels: Sequence[str] = DEFAULT_LEVELS, prior: str = enhance.PRIOR_DIR
) -> dict[str, Any]:
  """`fibseg study prior`: the cells of the context's stack and its prior.json/.md.

  The stack is named after the suite's stack, else "synthetic" (no --volume) or the
  folder that holds --volume.
  """
  seeds = ctx.seeds or context.DEFAULT_SEEDS
  runs.claim_study_directory(ctx.out, ctx.volume, kind=KIND, legacy=_legacy(levels, seeds))
  one = ctx.stack()
  name = ctx.stack_name or (
    os.path.basename(os.path.dirname(os.path.abspath(ctx.volume))) if ctx.volume else "synthetic"
  )
  model = _load_prior(prior)

  def load() -> Stack:
    return volume_stack(name, one.volume, one.train_slices, one.eval_slices, one.channels)

  cells = stack_cells(ctx.out, load, name, levels, one.seeds, model, ctx.log)
  if model is None:
    ctx.log(f"prior study: the forests of {name} are fitted and kept (--prior=none)")
    return {"rows": []}
  document = write_table(ctx.out, model.provenance.get("sha256"), stack_rows(name, cells, levels))
  ctx.log(markdown(document))
  return document


def combine(ctx: context.StudyContext, documents: Mapping[str, dict[str, Any]]) -> dict[str, Any]:
  """Over --stacks: the rows of every stack in ctx.out/prior.json and prior.md."""
  rows = [row for document in documents.values() for row in document["rows"]]
  if not rows:
    return {"rows": []}
  sha256 = next(iter(documents.values()))["prior"]
  document = write_table(ctx.out, sha256, rows)
  ctx.log(markdown(document))
  return document


def markdown(document: dict[str, Any]) -> str:
  """The summary as a markdown table: mean +- std over seeds, paired difference, times."""
  fmt = lambda s: f"{s['mean']:.3f} +- {s['std']:.3f}"  # noqa: E731
  lines = [
    "| stack | labels | forest | forest + prior | prior - forest (paired) | seeds | "
    "fit / forest / prior s |",
    "|---|---|---|---|---|---|---|",
  ]
  for r in document["rows"]:
    s = r["seconds"]
    lines.append(
      f"| {r['stack']} | {r['level']} | {fmt(r['forest'])} | {fmt(r['prior'])} | "
      f"{r['prior_minus_forest']['mean']:+.3f} +- {r['prior_minus_forest']['std']:.3f} | "
      f"{len(r['seeds'])} | {s['fit']} / {s['forest']} / {s['enhance']} |"
    )
  return "\n".join(lines) + "\n"


# Over --stacks (`suite.run_suite`): the rows of every stack in one table, not suite.json.
SUITE = {"combine": combine, "legacy": SUITE_LEGACY}
