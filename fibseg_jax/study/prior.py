"""The prior against the forest: held-out mean IoU from strokes or whole slices, with seeds.

For every stack, annotation level (`fibseg_jax.data.annotations.Level`: `strokes:0.02`
paints brush strokes over 2% of each training slice, `slices:3` labels three whole
ones) and seed, the level's labels are drawn from the truth of the training slices (new
strokes for every seed, as another user would paint them), a random forest is fitted on
them (the forest route, all painted pixels), and the evaluation slices are segmented by
the forest and by the shipped prior applied to that forest (`fibseg_jax.infer.enhance`).
The evaluation slices' labels are read only to score. Both rows share the forest, so
their difference is paired; wall times are those of this machine.

  python experiments/prior_study.py --out=results/prior --stack=synthetic \
    --stack=drosophila_vnc=/work/real/drosophila_vnc/vol.zarr:4,8,12:16

Writes OUT/<stack>/<level>_s<seed>/result.json (a finished cell is never redone),
OUT/prior.json and OUT/prior.md.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from fibseg_jax import baselines
from fibseg_jax.data import annotations, synth
from fibseg_jax.data import volume as volume_lib
from fibseg_jax.eval import metrics
from fibseg_jax.infer import enhance

DEFAULT_LEVELS = ("strokes:0.005", "strokes:0.02", "slices:1", "slices:3")
# The synthetic stack of the study budgets (configs/budgets/base.py).
SYNTHETIC = ("synthetic", (24, 384, 384), (5, 11, 17), (20,))


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


def synthetic() -> Stack:
  """The study budgets' generated stack (`SYNTHETIC`)."""
  name, shape, train, evaluate = SYNTHETIC
  stack = synth.generate(synth.SynthConfig(shape=shape, seed=0))
  zs = (*train, *evaluate)
  return Stack(
    name,
    {z: stack.image[z] for z in zs},
    {z: stack.labels[z] for z in zs},
    stack.classes,
    train,
    evaluate,
  )


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
  route = baselines.make_route("forest", len(stack.classes), seed=seed)
  start = time.perf_counter()
  route.fit([stack.images[z] for z in chosen], painted)
  seconds = {"fit": time.perf_counter() - start}
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


def run(
  out: str,
  stacks: Sequence[Any],
  *,
  levels: Sequence[str] = DEFAULT_LEVELS,
  seeds: Sequence[int] = (0, 1, 2),
  prior: enhance.Prior | None = None,
  log=print,
) -> dict[str, Any]:
  """Every cell (cached in OUT), then the summary table.

  Args:
    out: output folder.
    stacks: `Stack`s, or callables returning one (loaded only when a cell needs it).
    levels: annotation levels.
    seeds: seeds of the strokes and of the forest.
    prior: the prior; None fits and keeps the forests only (to run ahead of a prior).
    log: where progress lines go.
  """
  os.makedirs(out, exist_ok=True)
  rows = []
  for source in stacks:
    stack = None
    name = source.name if isinstance(source, Stack) else source.__name__
    cells = []
    for text in levels:
      level = annotations.Level.parse(text)
      for seed in seeds:
        directory = os.path.join(out, name, f"{level.kind}_{level.value:g}_s{seed}")
        path = os.path.join(directory, "result.json")
        if os.path.isfile(path):
          with open(path) as f:
            cells.append(json.load(f))
          continue
        if stack is None:
          stack = source if isinstance(source, Stack) else source()
        cell = run_cell(stack, level, seed, prior, directory)
        log(f"prior study: {name} {level.name} seed {seed}: {cell}")
        if prior is None:
          continue
        with open(f"{path}.partial", "w") as f:
          json.dump(cell, f, indent=1)
        os.replace(f"{path}.partial", path)
        cells.append(cell)
    for text in levels if prior is not None else ():
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
  if prior is None:
    return {"rows": []}
  document = {"prior": prior.provenance.get("sha256"), "rows": rows}
  with open(os.path.join(out, "prior.json"), "w") as f:
    json.dump(document, f, indent=1)
  with open(os.path.join(out, "prior.md"), "w") as f:
    f.write(markdown(document))
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
