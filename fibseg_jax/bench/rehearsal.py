"""A paper-size rehearsal: whole slices of the paper's size segmented with default flags.

The paper's stack is 156 x 3868 x 4062 with two signals (2.45 Gpixel). The rehearsal
generates (once; reused when it exists) a synthetic stack of `slices` slices of that
size with `synth`, segments it in a fresh process with `SegmentSettings()` defaults
(tta "auto"), sampling the child's resident set, times the bare jitted forward pass on
the same tile batches, and extrapolates the wall time to the paper's 156 slices.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from fibseg_jax import infer, models
from fibseg_jax.bench import jax_side, machine, segment_memory, timing
from fibseg_jax.bench.options import CHANNELS
from fibseg_jax.data import synth
from fibseg_jax.data import volume as volume_lib

PAPER_SHAPE = (156, 3868, 4062)


def generate(root: str, shape: Sequence[int], seed: int = 0) -> dict[str, Any]:
  """Writes a synthetic stack at `root` unless one of `shape` is there; returns its cost."""
  if os.path.exists(root):
    vol = volume_lib.open_volume(root, check_labels=False)
    if tuple(vol.shape) != tuple(shape):
      raise ValueError(f"--volume={root} holds {vol.shape}, not {tuple(shape)}; choose another")
    return {"generated": False}
  start = time.perf_counter()
  stack = synth.generate(synth.SynthConfig(shape=tuple(shape), seed=seed), progress=True)
  synth.write_volume(stack, root, [shape[0] // 2], progress=True)
  return {"generated": True, "seconds": time.perf_counter() - start}


def model_config(features: Sequence[int]) -> dict[str, Any]:
  config = models.default_config("unet")
  config.update(num_classes=len(synth.CLASSES), features=tuple(features))
  return config


def rehearse(
  root: str,
  output: str,
  *,
  features: Sequence[int],
  slices: int = 3,
  settings: infer.SegmentSettings | None = None,
  sample_rss_s: float = 2.0,
  bare_repeats: int = 3,
) -> dict[str, Any]:
  """Segments the stack at `root` in a child process and times the bare forward.

  Args:
    root: the volume (channels ICE and TLD).
    output: the labels array (replaced).
    features: the U-Net's widths (random weights: the time does not depend on them).
    slices: slab depth.
    settings: tile, overlap, batch, block and tta; default `SegmentSettings(tta="auto")`.
    sample_rss_s: period of the child's resident-set samples.
    bare_repeats: timed calls of each forward shape.

  Returns:
    The child's result (seconds, peak RSS, RSS samples), the forward calls, the bare
    seconds, the ratio segment / bare, Mpixel/s and the extrapolation to 156 slices.
  """
  settings = infer.SegmentSettings(tta="auto") if settings is None else settings
  vol = volume_lib.open_volume(root, check_labels=False)
  spec = {
    "volume": root,
    "output": output,
    "model": model_config(features),
    "slices": slices,
    "channels": list(CHANNELS),
    "tile": settings.tile,
    "overlap": settings.overlap,
    "batch": settings.batch,
    "block": settings.block,
    "tta": settings.tta,
    "sample_rss_s": sample_rss_s,
  }
  model, variables = segment_memory._model_and_variables(spec)
  predictor = infer.TilePredictor(
    model, variables, offset=[0.0, 0.0], scale=[1.0, 1.0], overlap=0, batch=settings.batch
  )
  counts = segment_memory.tile_batches(tuple(vol.shape), spec, predictor)
  del predictor

  def bare_step_s() -> dict[tuple[int, int, int], float]:
    step_s = {}
    rng = np.random.default_rng(0)
    for shape in sorted(counts):
      rows, ty, tx = shape
      image = rng.standard_normal((rows, slices, ty, tx, len(CHANNELS)), dtype=np.float32)
      forward = jax_side.JaxForward(spec["model"], image, variables=variables)
      step_s[shape] = timing.race({"bare": forward}, bare_repeats, 1)["bare"]["step_s_median"]
      forward.close()
    return step_s

  # The bare forward is timed before and after the child and averaged: on a shared
  # machine the load drifts over a run of minutes.
  load_start = machine.load_average()
  before = bare_step_s()
  child = segment_memory.run_child(spec)
  load_child = machine.load_average()
  after = bare_step_s()
  step_s = {s: (before[s] + after[s]) / 2 for s in counts}
  bare = segment_memory.bare_seconds(counts, step_s)
  depth = vol.shape[0]
  samples = child.get("rss_samples_mib", [])
  return {
    "volume": root,
    "shape": list(vol.shape),
    "model": {"features": list(features), "slices": slices, "channels": list(CHANNELS)},
    "settings": {k: spec[k] for k in ("tile", "overlap", "batch", "block", "tta")},
    "child": {k: v for k, v in child.items() if k != "rss_samples_mib"},
    "rss_mib": _rss_summary(samples),
    "forward_calls": {"x".join(map(str, s)): n for s, n in counts.items()},
    "bare_step_s": {"x".join(map(str, s)): t for s, t in step_s.items()},
    "bare_step_s_before_after": {"x".join(map(str, s)): [before[s], after[s]] for s in counts},
    "bare_s": bare,
    "segment_over_bare": child["seconds"] / bare,
    "mpx_per_s": child["mpixels"] / child["seconds"],
    "seconds_per_slice": child["seconds"] / depth,
    "paper_156_slices_s": child["seconds"] / depth * PAPER_SHAPE[0],
    "load_average": {"start": load_start, "after_child": load_child, "end": machine.load_average()},
  }


def _rss_summary(samples: Sequence[Sequence[float]]) -> dict[str, Any]:
  """Resident set over the run: max of each quarter (flat memory: they stay alike)."""
  if not samples:
    return {}
  values = [s[1] for s in samples]
  quarters = np.array_split(np.asarray(values), min(4, len(values)))
  return {
    "samples": len(values),
    "max_per_quarter": [float(q.max()) for q in quarters],
    "last": values[-1],
  }


def write(result: Mapping[str, Any], path: str) -> None:
  with open(path, "w") as f:
    json.dump(result, f, indent=1)
