"""What test-time augmentation buys per pass: held-out mean IoU against the pass count.

  curve = tta.passes_curve(["runs/s0", "runs/s1", "runs/s2"], "vol.zarr", [20],
                           out="tta_curve")
  print(tta.markdown(curve))

For each trained network (a seed) and each pass count k (the first k transforms of
`infer.predict.tta_transforms`: identity, x flip, y flip, both flips, the transposed
four, then each with the slab reversed), the evaluation slices alone are segmented
(`SegmentSettings.only_slices`) and scored with the study's metrics; the cost of k passes
is timed twice: the segmentation's wall time (cold: compiling included, as a user's first
run pays it) and the warm forward pass on the tiles of one evaluation region (seconds per
Mpixel of tiles, the steady state of a long stack). Rows give mean and std over seeds.
"""

from __future__ import annotations

import json
import os
import statistics
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from fibseg_jax import checkpoint as checkpoint_lib
from fibseg_jax import infer
from fibseg_jax.data import volume as volume_lib
from fibseg_jax.infer import tiling
from fibseg_jax.study import runs
from fibseg_jax.study.context import Option, StudyContext

PASSES = (1, 2, 4, 8, 16)


def _forward_s_per_mpixel(
  restored: Any, vol: volume_lib.Volume, passes: int, settings: infer.SegmentSettings, repeats: int
) -> float:
  """Median warm seconds per Mpixel of tiles of one batch of this tile size, k passes."""
  offset, scale = vol.normalization(restored.channels)
  predictor = infer.TilePredictor(
    restored.model,
    restored.variables,
    offset=offset,
    scale=scale,
    overlap=settings.overlap,
    window=settings.window,
    batch=settings.batch,
    tta=passes,
  )
  block = tiling.Block(
    0, 0, min(settings.block, vol.shape[1]), 0, min(settings.block, vol.shape[2])
  )
  geom = tiling.region_geometry(
    block,
    vol.shape[1:],
    halo=settings.overlap,
    tile=settings.tile,
    size_multiple=restored.size_multiple,
  )
  ty, tx = geom.tile_yx
  rng = np.random.default_rng(0)
  tiles = rng.integers(0, 255, (predictor.batch, restored.slices, ty, tx, len(restored.channels)))
  tiles = tiles.astype(np.uint16)
  predictor(tiles).block_until_ready()  # compile
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    predictor(tiles).block_until_ready()
    times.append(time.perf_counter() - start)
  return statistics.median(times) / (predictor.batch * ty * tx / 1e6)


def passes_curve(
  workdirs: Sequence[str],
  volume: str | volume_lib.Volume,
  eval_slices: Sequence[int],
  passes: Sequence[int] = PASSES,
  *,
  out: str,
  settings: infer.SegmentSettings | None = None,
  repeats: int = 3,
  log: Any = print,
) -> dict[str, Any]:
  """Held-out mean IoU and cost of each TTA pass count, per network and over them.

  Args:
    workdirs: trained networks (e.g. one per seed); each is scored on its own.
    volume: the volume, whose labels on `eval_slices` are the truth (held out).
    eval_slices: the slices segmented and scored.
    passes: pass counts (1 = no TTA; 16 = all for a slab).
    out: directory for the segmentations (eval slices only) and curve.json.
    settings: tiling of the segmentations (its tta and only_slices are replaced);
      default `SegmentSettings()`.
    repeats: timed repetitions of the warm forward pass.
    log: called with one line per (network, pass count).

  Returns:
    {"volume", "eval_slices", "workdirs", "passes", "runs": {workdir: {k: {mean_iou,
    segment_s, segment_s_per_mpixel, forward_s_per_mpixel}}}, "rows": [{passes,
    mean_iou, mean_iou_std, gain, gain_std, segment_s_per_mpixel, forward_s_per_mpixel,
    forward_cost}]} (std over networks; gain = mean IoU - that of 1 pass, paired by
    network; forward_cost = forward seconds over those of 1 pass).

  Raises:
    InferenceError: an eval slice outside the stack or a pass count --tta refuses.
  """
  settings = infer.SegmentSettings() if settings is None else settings
  vol = volume if isinstance(volume, volume_lib.Volume) else volume_lib.open_volume(volume)
  eval_slices = sorted({int(z) for z in eval_slices})
  passes = [infer.settings.parse_tta(k) for k in passes]
  if "auto" in passes:
    raise infer.InferenceError("--passes: give pass counts (1, 2, 4, 8, 16), not auto")
  os.makedirs(out, exist_ok=True)
  truths = runs.read_truths(vol, eval_slices)
  results: dict[str, dict[int, dict[str, float]]] = {}
  for w, workdir in enumerate(workdirs):
    restored = checkpoint_lib.load(workdir)
    results[workdir] = {}
    for k in passes:
      output = os.path.join(out, f"net{w}_tta{k}.zarr")
      segmented = infer.segment_from_checkpoint(
        workdir,
        vol,
        output=output,
        settings=infer.SegmentSettings(
          **{
            **{f: getattr(settings, f) for f in ("tile", "overlap", "batch", "block", "window")},
            "tta": k,
            "only_slices": eval_slices,
            "overwrite": True,
            "progress": False,
          }
        ),
      )
      labels = infer.open_array(output)
      predictions = {z: labels[z].read().result() for z in eval_slices}
      scored = runs.score(truths, predictions, vol.classes)
      forward = _forward_s_per_mpixel(restored, vol, k, settings, repeats)
      results[workdir][k] = {
        "mean_iou": scored["mean_iou"],
        "segment_s": segmented.seconds,
        "segment_s_per_mpixel": segmented.seconds / segmented.mpixels,
        "forward_s_per_mpixel": forward,
      }
      log(
        f"{workdir} tta={k}: mIoU {scored['mean_iou']:.4f}, segment {segmented.seconds:.1f} s, "
        f"forward {forward:.2f} s/Mpx"
      )
  document = {
    "volume": volume_lib.describe(vol.root),
    "eval_slices": eval_slices,
    "workdirs": list(workdirs),
    "passes": passes,
    "settings": {f: getattr(settings, f) for f in ("tile", "overlap", "batch", "block")},
    "runs": {w: {str(k): r for k, r in rk.items()} for w, rk in results.items()},
    "rows": curve_rows(results, passes),
  }
  with open(os.path.join(out, "curve.json"), "w") as f:
    json.dump(document, f, indent=1)
  return document


def _mean_std(values: Sequence[float]) -> tuple[float, float]:
  values = [float(v) for v in values]
  return float(np.mean(values)), float(np.std(values, ddof=1)) if len(values) > 1 else 0.0


def curve_rows(
  results: dict[str, dict[int, dict[str, float]]], passes: Sequence[int]
) -> list[dict[str, float]]:
  """One row per pass count: means and stds over networks (see `passes_curve`)."""
  rows = []
  base = {w: r[passes[0]] for w, r in results.items()}
  for k in passes:
    per = [(r[k], base[w]) for w, r in results.items()]
    miou, miou_std = _mean_std([r["mean_iou"] for r, _ in per])
    gain, gain_std = _mean_std([r["mean_iou"] - b["mean_iou"] for r, b in per])
    seg, _ = _mean_std([r["segment_s_per_mpixel"] for r, _ in per])
    fwd, fwd_std = _mean_std([r["forward_s_per_mpixel"] for r, _ in per])
    cost, _ = _mean_std([r["forward_s_per_mpixel"] / b["forward_s_per_mpixel"] for r, b in per])
    rows.append(
      {
        "passes": k,
        "mean_iou": miou,
        "mean_iou_std": miou_std,
        "gain": gain,
        "gain_std": gain_std,
        "segment_s_per_mpixel": seg,
        "forward_s_per_mpixel": fwd,
        "forward_s_per_mpixel_std": fwd_std,
        "forward_cost": cost,
      }
    )
  return rows


def markdown(document: dict[str, Any]) -> str:
  """The curve as a markdown table (mean +- std over networks)."""
  n = len(document["workdirs"])
  lines = [
    f"TTA passes on {document['volume']}, scored on slices {document['eval_slices']}, "
    f"{n} network(s); settings {document['settings']}.",
    "",
    "| passes | held-out mIoU | gain vs 1 pass (paired) | forward s/Mpx (warm) | x 1 pass "
    "| segment s/Mpx (cold, eval slices) |",
    "| ---: | ---: | ---: | ---: | ---: | ---: |",
  ]
  for r in document["rows"]:
    lines.append(
      f"| {r['passes']} | {r['mean_iou']:.4f} +- {r['mean_iou_std']:.4f} "
      f"| {100 * r['gain']:+.2f} +- {100 * r['gain_std']:.2f} pts "
      f"| {r['forward_s_per_mpixel']:.2f} +- {r['forward_s_per_mpixel_std']:.2f} "
      f"| {r['forward_cost']:.1f} | {r['segment_s_per_mpixel']:.1f} |"
    )
  return "\n".join(lines) + "\n"


USAGE = r"""Held-out mean IoU and cost against the number of TTA passes (`fibseg_jax.study.tta`).

  fibseg study tta --workdir=runs/syn/unet_s0 --workdir=runs/syn/unet_s1 \
    --workdir=runs/syn/unet_s2 --volume=runs/syn/vol.zarr --eval_slices=20 \
    --out=tta_curve/ [--passes=1,2,4,8,16]

Segments only --eval_slices with each pass count and each network, scores them against
the volume's labels there and times each count (cold segmentation and warm forward
pass). Writes OUT/curve.json and OUT/curve.md; mean +- std over the networks.
"""

OPTIONS = (
  Option("workdir", "multi_string", None, "Trained network (give one per seed)."),
  Option("passes", "list", [str(k) for k in PASSES], "Pass counts measured."),
)


def run(ctx: StudyContext, workdir: Sequence[str] = (), passes: Sequence[str] = ()) -> dict:
  """`fibseg study tta`: the curve of finished networks on ctx.eval_slices of ctx.volume."""
  required = {"workdir": (workdir, "runs/s0"), "volume": (ctx.volume, "vol.zarr")}
  required["eval_slices"] = (ctx.eval_slices, "20")
  for name, (value, example) in required.items():
    if not value:
      raise ValueError(f"--{name} is required, e.g. --{name}={example}")
  for path in workdir:
    if not os.path.exists(path):
      raise ValueError(f"--workdir={path}: no such directory")
  try:
    counts = [infer.settings.parse_tta(k) for k in passes or [str(k) for k in PASSES]]
    document = passes_curve(workdir, ctx.volume, ctx.eval_slices, counts, out=ctx.out)
  except infer.InferenceError as e:
    raise ValueError(str(e).replace("--tta=", "--passes=")) from None
  table = ctx.write_text("curve.md", markdown(document))
  ctx.log(open(table).read())
  ctx.log(f"wrote {ctx.out}/curve.json and curve.md")
  return document
