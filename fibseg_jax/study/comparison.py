"""The paper's comparison in one call: networks, a network on cleaned inputs, classical routes.

Protocol (Dong et al.): a few annotated training slices with 25% of their area held out
for validation, and an independent annotated evaluation slice. Rows:

  unet_1_<channels>      U-Net on one slice, for each single channel and all channels
  unet_3_<channels>      U-Net on a 3-slice slab
  sensor3d_3_<channels>  Sensor-3D on a 3-slice slab
  <best>_cleaned         the best of those, retrained on a cleaned copy of the volume
  otsu, clean_otsu, forest   the classical routes (`fibseg_jax.baselines`)
  monai_basicunet, nnunetv2_2d_small (and nnunetv2_2d)   peers (`peers`), when the
                         `peers` extra is installed

Every network gets the same step budget. Each run lives in `out/rows/<row>/seed_<s>/`
and a finished run (its `result.json`) is never recomputed, so rerunning the same
command resumes; `out/study.json`, `study.md` and `study.png` are rewritten after every
row.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import json
import os
import re
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from fibseg_jax import baselines, outputs
from fibseg_jax.data import synth
from fibseg_jax.data import volume as volume_lib
from fibseg_jax.study import budget as budget_lib
from fibseg_jax.study import figures, peers, runs
from fibseg_jax.study.context import StudyContext, seed_stats

NETWORKS = (("unet", 1), ("unet", 3), ("sensor3d", 3))
ROUTES = baselines.ROUTES
CLEANED = "cleaned"  # --rows pattern that selects the cleaned-input row
STUDY_CONFIG = "study_config.json"


class StudyError(ValueError):
  """A user mistake in the study's flags or output directory."""


@dataclasses.dataclass(frozen=True)
class Row:
  """One row of the table.

  Attributes:
    name: e.g. "unet_3_ice_tld".
    kind: "network", "classical" or "peer".
    architecture: "unet", "sensor3d", "otsu", "clean_otsu" or "forest".
    channels: input channels.
    slices: slab depth (1 for the classical routes, which see one slice).
    inputs: "raw" or "cleaned".
    seeds: training seeds (one run each).
  """

  name: str
  kind: str
  architecture: str
  channels: tuple[str, ...]
  slices: int
  inputs: str
  seeds: tuple[int, ...]


def channel_tag(channels: Sequence[str]) -> str:
  """("ICE", "TLD") -> "ice_tld"."""
  return "_".join(re.sub(r"[^a-z0-9]+", "-", c.lower()).strip("-") or "c" for c in channels)


def channel_sets(channels: Sequence[str]) -> list[tuple[str, ...]]:
  """Each channel alone, then all of them together (when there are several)."""
  sets = [(c,) for c in channels]
  return sets + [tuple(channels)] if len(channels) > 1 else sets


def plan_rows(budget: budget_lib.Budget, channels: Sequence[str]) -> list[Row]:
  """The network rows and the classical rows (the cleaned row is added once a best exists)."""
  rows = []
  for architecture, slices in NETWORKS:
    for chans in channel_sets(channels):
      name = f"{architecture}_{slices}_{channel_tag(chans)}"
      seeds = budget.spread_seeds if name in budget.spread_rows else budget.seeds
      rows.append(Row(name, "network", architecture, chans, slices, "raw", tuple(seeds)))
  for route in ROUTES:
    # The Otsu routes are deterministic: one run says all.
    seeds = budget.seeds if route == "forest" else (0,)
    rows.append(Row(route, "classical", route, tuple(channels), 1, "raw", tuple(seeds)))
  return rows


def cleaned_row(best: Row, budget: budget_lib.Budget) -> Row:
  return dataclasses.replace(
    best, name=f"{best.name}_{CLEANED}", inputs=CLEANED, seeds=tuple(budget.seeds)
  )


def aggregate(row: Row, results: Sequence[dict[str, Any]], classes: Sequence[str]) -> dict:
  """One row of study.json from its runs (one per seed).

  `std` is the sample standard deviation over seeds (None with a single run).
  """

  def per_class(key: str, stat: str = "mean") -> dict[str, float | None]:
    return {c: seed_stats([r[key][c] for r in results])[stat] for c in classes}

  return {
    "name": row.name,
    "kind": row.kind,
    "architecture": row.architecture,
    "channels": list(row.channels),
    "slices": row.slices,
    "inputs": row.inputs,
    "params": int(round(np.mean([r["params"] for r in results]))),
    "seeds": [r["seed"] for r in results],
    "train_seconds": float(np.mean([r["train_seconds"] for r in results])),
    "segment_seconds": float(np.mean([r["segment_seconds"] for r in results])),
    "mean_iou": seed_stats([r["mean_iou"] for r in results]),
    "accuracy": seed_stats([r["accuracy"] for r in results]),
    "per_class_iou": per_class("per_class_iou"),
    "per_class_iou_std": {
      c: seed_stats([r["per_class_iou"][c] for r in results])["std"] for c in classes
    },
    "fraction_error": per_class("fraction_error"),
    "runs": list(results),
  }


@dataclasses.dataclass(frozen=True)
class Setup:
  """The stack and protocol of a study (or of one sweep point)."""

  volume: str
  train_slices: tuple[int, ...]
  eval_slices: tuple[int, ...]
  held_out: tuple[int, ...]
  channels: tuple[str, ...]
  classes: tuple[str, ...]

  def to_json(self) -> dict[str, Any]:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}


def synthetic_volume(
  path: str,
  budget: budget_lib.Budget,
  annotate: Sequence[int] | None = None,
  **severities: float,
) -> volume_lib.Volume:
  """Opens `path`, first generating the budget's synthetic stack there if it is missing.

  Args:
    path: local volume path.
    budget: shape and annotated slices.
    annotate: slices written with labels; default the budget's training and evaluation
      slices.
    **severities: artifact severities of `synth.SynthConfig` (default 1 each).
  """
  if not os.path.exists(path):
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    config = synth.SynthConfig(shape=budget.shape, seed=0, **severities)
    stack = synth.generate(config)
    if annotate is None:
      annotate = (*budget.train_slices, *budget.eval_slices)
    synth.write_volume(stack, path, annotate)
    synth.save_preview(stack, budget.eval_slices[0], path + ".preview.png")
  return volume_lib.open_volume(path)


def setup(
  vol: volume_lib.Volume,
  train_slices: Sequence[int] | None,
  eval_slices: Sequence[int],
  *,
  flags: tuple[str, str] = ("--train_slices", "--eval_slices"),
) -> Setup:
  """Checks the slices against the volume's annotations.

  Args:
    vol: the volume.
    train_slices: annotated slices to train on; None: every annotated slice that is not
      an evaluation slice.
    eval_slices: annotated slices to score.
    flags: the flag names to mention in errors.

  Raises:
    StudyError: a slice is not annotated, the two overlap, or one of them is empty.
  """
  annotated = set(vol.metadata.annotated_slices)
  where = volume_lib.describe(vol.root)
  eval_slices = tuple(sorted(set(int(z) for z in eval_slices)))
  if not eval_slices:
    raise StudyError(f"{flags[1]}: give at least one annotated slice of {where} to score on")
  if train_slices is None:
    train_slices = sorted(annotated - set(eval_slices))
  train_slices = tuple(sorted(set(int(z) for z in train_slices)))
  for flag, slices in zip(flags, (train_slices, eval_slices), strict=True):
    missing = [z for z in slices if z not in annotated]
    if missing:
      raise StudyError(
        f"{flag}: slice(s) {missing} have no labels in {where} (annotated: {sorted(annotated)})"
      )
  if not train_slices:
    raise StudyError(f"{flags[0]}: no annotated slice of {where} is left to train on")
  both = sorted(set(train_slices) & set(eval_slices))
  if both:
    raise StudyError(f"{flags[0]} and {flags[1]} share slice(s) {both}; keep them apart")
  return Setup(
    volume=volume_lib.local_path(vol.root) or volume_lib.describe(vol.root),
    train_slices=train_slices,
    eval_slices=eval_slices,
    held_out=tuple(sorted(annotated - set(train_slices))),
    channels=tuple(vol.channels),
    classes=tuple(vol.classes),
  )


def _differences(a: Any, b: Any, prefix: str = "") -> list[str]:
  """Dotted keys where two JSON documents differ."""
  if isinstance(a, dict) and isinstance(b, dict):
    out = []
    for k in sorted(set(a) | set(b)):
      out += _differences(a.get(k), b.get(k), f"{prefix}{k}.")
    return out
  return [] if a == b else [prefix.rstrip(".")]


def check_output(
  out: str, config_file: str, identity: dict[str, Any], *, record: bool = True
) -> None:
  """Checks that `out` holds nothing or results of the same settings, then records them.

  Args:
    out: the output directory.
    config_file: where the settings are recorded, inside `out`.
    identity: the settings (JSON); only its keys are compared.
    record: write `identity` when `out` has no record yet.

  Raises:
    StudyError: `out` holds results of different settings.
  """
  path = os.path.join(out, config_file)
  kind = config_file.split("_")[0]  # "study", "sweep", "semi"
  try:  # only an empty directory or one of our own results of this kind
    outputs.claim(
      out,
      kind=kind,
      flag="--out",
      directory=True,
      legacy=(config_file,),
    )
  except outputs.OutputError as e:
    raise StudyError(str(e)) from e
  if os.path.exists(path):
    with open(path) as f:
      saved = json.load(f)
    differ = _differences({k: saved.get(k) for k in identity}, identity)
    if differ:
      raise StudyError(
        f"--out={out} holds results of other settings (they differ in {', '.join(differ)}; "
        f"see {path}); rerun with the same flags to resume, or use a new --out"
      )
  elif record:
    runs.write_json(path, identity)


def _select(name: str, patterns: Sequence[str] | None, *aliases: str) -> bool:
  if not patterns:
    return True
  return any(fnmatch.fnmatchcase(n, p) for p in patterns for n in (name, *aliases))


def iou_text(stats: dict[str, float | None]) -> str:
  if stats["mean"] is None:
    return "n/a"
  spread = f" ± {stats['std']:.3f}" if stats["std"] is not None else ""
  return f"{stats['mean']:.3f}{spread}"


def run_study(
  out: str,
  budget: budget_lib.Budget,
  *,
  volume: str | None = None,
  train_slices: Sequence[int] | None = None,
  eval_slices: Sequence[int] | None = None,
  rows: Sequence[str] | None = None,
  log: Callable[[str], None] = print,
) -> dict[str, Any]:
  """Runs (or resumes) the study and writes study.json, study.md and study.png.

  Args:
    out: output directory.
    budget: the budget.
    volume: a volume to study; default the budget's synthetic stack (`out/volume.zarr`).
    train_slices: annotated slices to train on; default the budget's for the synthetic
      stack, every annotated slice but the evaluation ones for a given volume.
    eval_slices: annotated slices to score; default the budget's for the synthetic
      stack; required with `volume`.
    rows: fnmatch patterns of the rows to run (e.g. "unet_*", "forest", "cleaned");
      default all.
    log: receives one progress line per row.

  Returns:
    The study.json document.

  Raises:
    StudyError: flags that do not fit the volume or `out`.
  """
  os.makedirs(out, exist_ok=True)
  source = {"budget": budget.to_json(), "source": volume or "synthetic"}
  check_output(out, STUDY_CONFIG, source, record=False)  # before generating anything
  if volume is None:
    if train_slices is not None or eval_slices is not None:
      raise StudyError(
        "--train_slices / --eval_slices apply to a --volume; the synthetic stack uses the "
        f"budget's ({list(budget.train_slices)} / {list(budget.eval_slices)})"
      )
    vol = synthetic_volume(os.path.join(out, "volume.zarr"), budget)
    train_slices, eval_slices = budget.train_slices, budget.eval_slices
  else:
    if not eval_slices:
      raise StudyError("--eval_slices is required with --volume, e.g. --eval_slices=20")
    try:
      vol = volume_lib.open_volume(volume)
    except volume_lib.VolumeError as e:
      raise StudyError(f"--volume: {e}") from None
  study = setup(vol, train_slices, eval_slices)
  check_output(out, STUDY_CONFIG, {**source, "setup": study.to_json()})
  plan = plan_rows(budget, study.channels)
  classes = study.classes
  done: dict[str, dict[str, Any]] = {}
  start = time.perf_counter()
  row_dir = lambda name: os.path.join(out, "rows", name)  # noqa: E731
  # Peer rows (`peers`): those selected whose extra imports; a line for those that do not.
  for peer in peers.PEERS:
    if peers.selected(peer, rows, _select):
      note = peers.missing(peer, budget)
      if note:
        log(note)
        continue
    seeds = tuple(budget.seeds)
    plan.append(Row(peer.name, "peer", peer.architecture, study.channels, 1, "raw", seeds))
  order = [r for r in plan if r.kind == "classical"] + [r for r in plan if r.kind != "classical"]
  total = len(plan) + 1  # and the cleaned row

  def finish(row: Row, results: list[dict[str, Any]], resumed: bool, number: int) -> None:
    entry = aggregate(row, results, classes)
    done[row.name] = entry
    runs.write_json(os.path.join(row_dir(row.name), "row.json"), entry)
    _write(out, budget, study, plan, done)
    what = "finished earlier" if resumed else f"train {entry['train_seconds']:.0f} s/seed"
    log(
      f"[{number:2d}/{total}] {row.name}: mean IoU {iou_text(entry['mean_iou'])} over seeds "
      f"{','.join(map(str, entry['seeds']))} ({what}; "
      f"{(time.perf_counter() - start) / 60:.1f} min so far)"
    )

  def run_row(row: Row, volume_path: str, compute: bool, number: int) -> None:
    """Runs the row's missing seeds; without `compute`, only shows a finished row."""
    results, resumed = [], True
    for seed in row.seeds:
      directory = os.path.join(row_dir(row.name), f"seed_{seed}")
      result = runs.read_result(directory)
      if result is None and not compute:
        return
      if result is None:
        resumed = False
        if row.kind == "network":
          result = runs.run_network(
            directory,
            budget,
            architecture=row.architecture,
            channels=row.channels,
            slices=row.slices,
            seed=seed,
            volume=volume_path,
            truth_volume=vol,
            eval_slices=study.eval_slices,
            held_out=study.held_out,
          )
        else:
          cell = runs.Cell(vol, row.channels, seed, study.eval_slices, study.held_out)
          if row.kind == "peer":
            result = peers.run_peer(peers.BY_NAME[row.name], directory, budget, cell)
          else:
            result = runs.run_route(directory, budget, row.architecture, cell)
      results.append(result)
    finish(row, results, resumed, number)

  for number, row in enumerate(order, 1):
    # Rows left out by --rows still show in the table if an earlier run finished them.
    compute = _select(row.name, rows)
    if row.kind == "peer":
      compute = peers.selected(peers.BY_NAME[row.name], rows, _select)
    run_row(row, study.volume, compute, number)
  # The best network on raw inputs, retrained on a cleaned copy of the volume.
  networks = [done[r.name] for r in plan if r.kind == "network" and r.name in done]
  if networks:
    best_entry = max(networks, key=lambda e: e["mean_iou"]["mean"] or -1.0)
    best = next(r for r in plan if r.name == best_entry["name"])
    row = cleaned_row(best, budget)
    compute = _select(row.name, rows, CLEANED)
    cleaned = os.path.join(out, "cleaned.zarr")
    if compute and not os.path.exists(cleaned):
      baselines.clean_volume(vol, cleaned, budget.cleaning)
    plan.append(row)
    run_row(row, cleaned, compute, total)
  elif _select(CLEANED, rows):
    log(f"[{total:2d}/{total}] {CLEANED}: skipped, no network row has finished")
  return _write(out, budget, study, plan, done)


def _write(
  out: str,
  budget: budget_lib.Budget,
  study: Setup,
  plan: Sequence[Row],
  done: dict[str, dict[str, Any]],
) -> dict[str, Any]:
  """Writes study.json, study.md and study.png from the finished rows, in table order."""
  network = [r.name for r in plan if r.kind == "network" and r.inputs == "raw"]
  cleaned = [r.name for r in plan if r.inputs == CLEANED]
  classical = [r.name for r in plan if r.kind == "classical"]
  peer = [r.name for r in plan if r.kind == "peer"]
  names = [n for n in (*network, *cleaned, *peer, *classical) if n in done]
  document = {
    "budget": budget.to_json(),
    "setup": study.to_json(),
    "rows": [done[n] for n in names],
  }
  runs.write_json(os.path.join(out, "study.json"), document)
  with open(os.path.join(out, "study.md"), "w") as f:
    f.write(markdown(document))
  if names:
    figures.study_chart(document, os.path.join(out, "study.png"))
  return document


def _pp(value: float | None) -> str:
  return "n/a" if value is None else f"{100 * value:+.1f}"


def markdown(document: dict[str, Any]) -> str:
  """The study table as Markdown."""
  b, s = document["budget"], document["setup"]
  classes = s["classes"]
  lines = [
    f"# Study on {s['volume']} (budget {b['name']})",
    "",
    f"Trained on annotated slices {s['train_slices']} (25% of their area held out for "
    f"validation), scored on slice(s) {s['eval_slices']}. Every network: {b['steps']} steps, "
    f"batch {b['batch_size']}, patch {b['patch']}. Mean IoU is the mean over seeds ± the "
    "sample standard deviation (no spread with one seed); per-class IoU is the mean over "
    "seeds; fraction error is predicted minus true phase fraction on the scored voxels, in "
    "percentage points.",
    "",
    "| row | architecture | channels | slices | inputs | params | seeds | train s | mean IoU | "
    + " | ".join(f"IoU {c}" for c in classes)
    + " | fraction error (pp) "
    + " / ".join(classes)
    + " |",
    "|" + "---|" * 9 + "---:|" * len(classes) + "---|",
  ]
  for r in document["rows"]:
    iou = " | ".join(
      "n/a" if r["per_class_iou"][c] is None else f"{r['per_class_iou'][c]:.3f}" for c in classes
    )
    err = " / ".join(_pp(r["fraction_error"][c]) for c in classes)
    lines.append(
      f"| {r['name']} | {r['architecture']} | {'+'.join(r['channels'])} | {r['slices']} | "
      f"{r['inputs']} | {r['params']:,} | {','.join(map(str, r['seeds']))} | "
      f"{r['train_seconds']:.0f} | {iou_text(r['mean_iou'])} | {iou} | {err} |"
    )
  return "\n".join(lines + peers.notes(document["rows"])) + "\n"


USAGE = r"""The paper's comparison in one command: networks, cleaned inputs, classical routes.

  fibseg study comparison --out=study/ [--budget=quick|paper]
  fibseg study comparison --out=study/ --volume=vol.zarr --train_slices=5,11,17 \
    --eval_slices=20

Default volume: a generated synthetic stack with every artifact at its default
(`out/volume.zarr`). Rows: U-Net on 1 and 3 slices and Sensor-3D on 3 slices, each fed
each channel alone and all together; the best of those retrained on a cleaned copy of
the volume; multi-Otsu, cleaning + multi-Otsu and a random forest. Writes study.json,
study.md and study.png to --out, with one progress line per row. Rerunning the same
command resumes: finished runs are not recomputed. --budget=quick fits 60 minutes on 2
CPU cores; paper is for an accelerator; smoke checks the pipeline on a tiny stack. Compiled
steps are cached in OUT/.jax_cache (or $JAX_COMPILATION_CACHE_DIR).
--rows=PATTERN,... runs only matching rows (e.g. --rows='unet_3_*,forest,cleaned').
Peer rows (fibseg_jax/study/peers.py) run by default when the `peers` extra is installed
(`pip install -e '.[peers]'`): monai_basicunet and nnunetv2_2d_small (nnU-Net's planner,
patch capped at the budget's); nnunetv2_2d (nnU-Net's own plan) only when --rows names it.
"""


def run(ctx: StudyContext) -> dict[str, Any]:
  """`fibseg study comparison`: `run_study` on the context's stack and rows."""
  document = run_study(
    ctx.out,
    ctx.budget,
    volume=ctx.volume,
    train_slices=ctx.train_slices,
    eval_slices=ctx.eval_slices,
    rows=ctx.rows,
    log=ctx.log,
  )
  ctx.log(f"wrote {ctx.out}/study.json, study.md, study.png ({len(document['rows'])} rows)")
  return document
