"""Artifact sweep: mean IoU against the severity of each artifact, the others at default.

For each artifact (curtaining, detector shading, noise) and each severity level (a
multiple of the default strength, 0 = off), a synthetic stack of the same sample
(`fibseg_jax.data.synth`: the phantom does not depend on the severities) is generated
and three methods are trained on its annotated slices and scored on its evaluation
slice, exactly as in the study:

  network     the best network on raw data (from a finished study.json, else the
              budget's `sweep_network`)
  clean_otsu  the cleaned classical route (destripe, flat field, denoise, multi-Otsu)
  forest      the random forest on multiscale features

The all-default stack is shared by the three curves. Runs live in
`out/points/<point>/<method>/seed_<s>/` and are never recomputed; sweep.json and
sweep.png are rewritten after every point.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Sequence
from typing import Any

from fibseg_jax.study import ablation, comparison, figures, runs
from fibseg_jax.study import budget as budget_lib
from fibseg_jax.study.context import Option, StudyContext

ARTIFACTS = ("curtaining", "shading", "noise")
METHODS = {
  "network": "best network, raw data",
  "clean_otsu": "cleaned + multi-Otsu",
  "forest": "random forest",
}


def point_key(artifact: str | None, level: float) -> str:
  """'default' for the all-default stack, else e.g. 'noise_2' or 'shading_0.5'."""
  return "default" if artifact is None or level == 1.0 else f"{artifact}_{level:g}"


def best_network(study_json: str) -> dict[str, Any]:
  """The best raw-input network row of a finished study.json (highest mean IoU).

  Raises:
    comparison.StudyError: the file is missing or holds no network row.
  """
  try:
    with open(study_json) as f:
      rows = json.load(f)["rows"]
  except (OSError, ValueError, KeyError) as e:
    raise comparison.StudyError(f"--best_from={study_json}: not a study.json ({e})") from None
  networks = [r for r in rows if r["kind"] == "network" and r["inputs"] == "raw"]
  if not networks:
    raise comparison.StudyError(f"--best_from={study_json}: no network row has finished")
  best = max(networks, key=lambda r: r["mean_iou"]["mean"] or -1.0)
  return {
    "architecture": best["architecture"],
    "slices": int(best["slices"]),
    "channels": list(best["channels"]),
    "source": f"best row of {study_json}: {best['name']}",
  }


def run_sweep(
  out: str,
  budget: budget_lib.Budget,
  *,
  best_from: str | None = None,
  recipe: Sequence[str] = (),
  log: Callable[[str], None] = print,
) -> dict[str, Any]:
  """Runs (or resumes) the sweep and writes sweep.json and sweep.png.

  Args:
    out: output directory.
    budget: levels, seeds, stack shape and the networks' budget.
    best_from: a study.json whose best network to sweep; default the budget's.
    recipe: parts of the training recipe (`ablation.PARTS`, e.g. "artifacts") the
      network is trained with besides its shipped config; the routes are unchanged.
    log: receives one progress line per stack.

  Returns:
    The sweep.json document.

  Raises:
    comparison.StudyError: `best_from` is unusable, or `out` holds another sweep.
  """
  os.makedirs(out, exist_ok=True)
  if best_from:
    network = best_network(best_from)
  else:
    architecture, slices, channels = budget.sweep_network
    network = {
      "architecture": architecture,
      "slices": int(slices),
      "channels": list(channels),
      "source": f"budget {budget.name}",
    }
  overrides = ablation.parts(recipe)
  if recipe:
    network["recipe"] = list(recipe)
  comparison.check_output(
    out,
    "sweep_config.json",
    {"budget": budget.to_json(), "network": {k: v for k, v in network.items() if k != "source"}},
  )
  levels = sorted(set(float(v) for v in budget.sweep_levels))
  points = [("default", None, 1.0)]
  points += [
    (point_key(a, v), a, v) for a in ARTIFACTS for v in levels if point_key(a, v) != "default"
  ]
  results: dict[str, dict[str, list[dict[str, Any]]]] = {}
  start = time.perf_counter()
  for i, (key, artifact, level) in enumerate(points, 1):
    severities = {artifact: level} if artifact else {}
    path = os.path.join(out, "volumes", f"{key}.zarr")
    vol = comparison.synthetic_volume(path, budget, **severities)
    setup = comparison.setup(vol, budget.train_slices, budget.eval_slices)
    channels = tuple(network["channels"])
    missing = [c for c in channels if c not in setup.channels]
    if missing:
      raise comparison.StudyError(
        f"the sweep's network reads channel(s) {missing}; the synthetic stack has "
        f"{list(setup.channels)}"
      )
    results[key] = {}
    for method in METHODS:
      seeds = budget.sweep_seeds if method != "clean_otsu" else (0,)
      results[key][method] = []
      for seed in seeds:
        directory = os.path.join(out, "points", key, method, f"seed_{seed}")
        result = runs.read_result(directory)
        if result is None and method == "network":
          result = runs.run_network(
            directory,
            budget,
            architecture=network["architecture"],
            channels=channels,
            slices=network["slices"],
            seed=seed,
            volume=setup.volume,
            truth_volume=vol,
            eval_slices=setup.eval_slices,
            held_out=setup.held_out,
            configure=lambda config: runs.set_fields(config, overrides),
          )
        elif result is None:
          cell = runs.Cell(vol, setup.channels, seed, setup.eval_slices, setup.held_out)
          result = runs.run_route(directory, budget, method, cell)
        results[key][method].append(result)
    document = _document(budget, network, levels, points, results)
    runs.write_json(os.path.join(out, "sweep.json"), document)
    figures.sweep_plot(document, os.path.join(out, "sweep.png"))
    summary = ", ".join(
      f"{m} {comparison.iou_text(comparison.seed_stats([r['mean_iou'] for r in rs]))}"
      for m, rs in results[key].items()
    )
    what = "default stack" if artifact is None else f"{artifact} x{level:g}"
    log(
      f"[{i}/{len(points)}] {what}: mean IoU {summary} "
      f"({(time.perf_counter() - start) / 60:.1f} min so far)"
    )
  return document


def _document(budget, network, levels, points, results) -> dict[str, Any]:
  """sweep.json: per artifact and method, mean IoU (mean, std over seeds) per severity."""
  artifacts: dict[str, dict[str, list[dict[str, Any]]]] = {}
  for artifact in ARTIFACTS:
    curves = artifacts.setdefault(artifact, {m: [] for m in METHODS})
    for level in levels:
      key = point_key(artifact, level)
      if key not in results:
        continue
      for method, rs in results[key].items():
        classes = list(rs[0]["per_class_iou"])
        curves[method].append(
          {
            "severity": level,
            "point": key,
            "seeds": [r["seed"] for r in rs],
            "mean_iou": comparison.seed_stats([r["mean_iou"] for r in rs]),
            "per_class_iou": {
              c: comparison.seed_stats([r["per_class_iou"][c] for r in rs])["mean"] for c in classes
            },
            "train_seconds": sum(r["train_seconds"] for r in rs) / len(rs),
          }
        )
  return {
    "budget": budget.to_json(),
    "network": network,
    "methods": METHODS,
    "levels": levels,
    "points": [
      {"point": key, "artifact": artifact, "severity": level} for key, artifact, level in points
    ],
    "artifacts": artifacts,
  }


USAGE = r"""Artifact sweep: mean IoU against curtaining, detector shading and noise severity.

  fibseg study sweep --out=sweep/ [--budget=quick|paper] \
    [--best_from=study/study.json] [--recipe=artifacts]

Each artifact goes from 0 to 2x its default strength with the others at default, on
synthetic stacks of the same sample; at every level the best network on raw data (the
best row of --best_from, else the budget's: a 3-slice U-Net on ICE+TLD), the cleaned
classical route and the random forest are trained and scored as in study.py
(--recipe: the network also with parts of the training recipe, as in fibseg study ablation). Writes
sweep.json and sweep.png (one panel per artifact). Rerunning resumes. --budget=quick
fits 60 minutes on 2 CPU cores. Compiled steps are cached in OUT/.jax_cache (or
$JAX_COMPILATION_CACHE_DIR).
"""

OPTIONS = (
  Option("best_from", "string", None, "A study.json whose best raw-input network is swept."),
  Option(
    "recipe",
    "list",
    [],
    "Train the network with these parts of the recipe on (the ablation's parts, e.g. "
    "artifacts: curtaining, shading, charging and drift augmentation); use a new --out.",
  ),
)


def run(ctx: StudyContext, best_from: str | None = None, recipe: Sequence[str] = ()) -> dict:
  """`fibseg study sweep`: `run_sweep` into the context's folder."""
  document = run_sweep(ctx.out, ctx.budget, best_from=best_from, recipe=recipe, log=ctx.log)
  ctx.log(f"wrote {ctx.out}/sweep.json, sweep.png")
  return document
