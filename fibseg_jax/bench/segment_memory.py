r"""Whole-volume segmentation against the bare forward pass, and its peak memory.

Each segmentation runs in a fresh process, so the benchmark's own resident set (two
frameworks, a dozen compiled steps) does not pollute its peak:

  python -m fibseg_jax.bench.segment_memory '{"volume": "v.zarr", "output": "s.zarr",
      "model": {"name": "unet", ...}, "slices": 3, "channels": ["ICE", "TLD"],
      "tile": 256, "overlap": 32, "batch": 4, "block": 512}'

prints one JSON line: the process's peak RSS (VmHWM) before and after
`infer.segment_volume`, its seconds and output Mpixels. The model is freshly initialised
(numpy draws: nothing compiles but the segmentation's own forward pass).

`measure_segmentation` segments a 1x and a 4x volume (4 times the slices) in two
children and times the bare jitted forward on the tile batches the segmentation ran.
"""

from __future__ import annotations

import collections
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Mapping
from typing import Any

import numpy as np

from fibseg_jax import infer, models
from fibseg_jax.bench import data_path, jax_side, machine, timing
from fibseg_jax.bench.options import CHANNELS, RACE, STUDY_BY_NAME, Options, model_config
from fibseg_jax.data import volume as volume_lib
from fibseg_jax.infer import tiling

CHILD_TIMEOUT_S = 3600


def spec_for(options: Options, volume: str, output: str) -> dict[str, Any]:
  """The child's job: the race's U-Net (3 slices, ICE and TLD) with the segment flags."""
  study = STUDY_BY_NAME[RACE]
  return {
    "volume": volume,
    "output": output,
    "model": model_config(options, study.model),
    "slices": study.slices,
    "channels": list(study.channels),
    "tile": options.segment_tile,
    "overlap": options.segment_overlap,
    "batch": options.segment_batch,
    "block": options.segment_block,
  }


def _model_and_variables(spec: Mapping[str, Any]):
  model = models.build(spec["model"])
  shape = (1, spec["slices"], spec["tile"], spec["tile"], len(spec["channels"]))
  return model, jax_side.random_variables(model, shape, seed=spec.get("seed", 0))


def segment(spec: Mapping[str, Any]) -> dict[str, Any]:
  """Segments `spec["volume"]` with a fresh model; the child process's whole job.

  Returns:
    {"rss_before_mib", "peak_rss_mib", "seconds", "mpixels", "blocks", "complete"}.
  """
  model, variables = _model_and_variables(spec)
  vol = volume_lib.open_volume(spec["volume"], check_labels=False)
  before = machine.peak_rss_mib()
  sampler = RssSampler(spec["sample_rss_s"]) if spec.get("sample_rss_s") else None
  result = infer.segment_volume(
    vol,
    model,
    variables,
    channels=spec["channels"],
    slices=spec["slices"],
    output=spec["output"],
    size_multiple=models.size_multiple(spec["model"]),
    settings=infer.SegmentSettings(
      tile=spec["tile"],
      overlap=spec["overlap"],
      batch=spec["batch"],
      block=spec["block"],
      tta=spec.get("tta", False),
      overwrite=True,
      progress=False,
    ),
  )
  out = {
    "rss_before_mib": before,
    "peak_rss_mib": machine.peak_rss_mib(),
    "seconds": result.seconds,
    "mpixels": result.mpixels,
    "blocks": result.blocks_done,
    "complete": result.complete,
  }
  if sampler is not None:
    out["rss_samples_mib"] = sampler.stop()
  return out


class RssSampler:
  """Samples this process's resident set (VmRSS) every `period_s` in a daemon thread."""

  def __init__(self, period_s: float):
    self._period = float(period_s)
    self._stop = threading.Event()
    self._start = time.perf_counter()
    self.samples: list[tuple[float, float]] = []
    self._thread = threading.Thread(target=self._run, daemon=True, name="fibseg-rss")
    self._thread.start()

  def _run(self) -> None:
    while not self._stop.wait(self._period):
      self.samples.append((round(time.perf_counter() - self._start, 1), _rss_mib()))

  def stop(self) -> list[tuple[float, float]]:
    """Stops sampling; returns [(seconds since start, MiB)]."""
    self._stop.set()
    self._thread.join()
    return self.samples


def _rss_mib() -> float:
  with open("/proc/self/status") as f:
    for line in f:
      if line.startswith("VmRSS:"):
        return round(int(line.split()[1]) / 1024, 1)
  return float("nan")


def run_child(spec: Mapping[str, Any]) -> dict[str, Any]:
  """Runs `segment(spec)` in a fresh Python process; returns what it printed.

  Raises:
    RuntimeError: the child failed (its stderr's end is in the message).
  """
  proc = subprocess.run(
    [sys.executable, "-m", "fibseg_jax.bench.segment_memory", json.dumps(spec)],
    capture_output=True,
    text=True,
    timeout=CHILD_TIMEOUT_S,
    env=dict(os.environ),
  )
  if proc.returncode != 0:
    raise RuntimeError(
      f"segmentation child on {spec['volume']} exited {proc.returncode}:\n{proc.stderr[-3000:]}"
    )
  return json.loads(proc.stdout.strip().splitlines()[-1])


def tile_batches(
  shape: tuple[int, int, int], spec: Mapping[str, Any], predictor: infer.TilePredictor
) -> dict[tuple[int, int, int], int]:
  """How many forward calls of each shape `segment_volume` makes on a volume.

  Follows its plan: blocks, each block's region and tile grid, batches of
  `predictor.batch` tiles, the last one padded to `predictor.padded_size`.

  Returns:
    {(rows, tile_y, tile_x): calls}.
  """
  counts: collections.Counter = collections.Counter()
  multiple = models.size_multiple(spec["model"])
  for block in tiling.plan_blocks(shape, spec["block"]):
    geom = tiling.region_geometry(
      block, shape[1:], halo=spec["overlap"], tile=spec["tile"], size_multiple=multiple
    )
    n = len(tiling.tile_grid(geom.shape, geom.tile_yx, spec["overlap"]))
    full, rest = divmod(n, predictor.batch)
    if full:
      counts[(predictor.batch, *geom.tile_yx)] += full
    if rest:
      counts[(predictor.padded_size(rest), *geom.tile_yx)] += 1
  return dict(counts)


def bare_seconds(counts: Mapping[tuple, int], step_s: Mapping[tuple, float]) -> float:
  """Seconds the bare forward takes for `counts` calls at `step_s` seconds per call shape."""
  return sum(n * step_s[shape] for shape, n in counts.items())


def efficiency(
  small: Mapping[str, Any],
  large: Mapping[str, Any],
  small_bare_s: float,
  large_bare_s: float,
) -> dict[str, Any]:
  """Segmentation Mpixel/s over the bare forward's, on the work the 4x volume adds.

  The difference of the two runs cancels what does not grow with the volume (compiling
  the forward pass, opening the outputs, starting the reader thread), so the figure is
  the steady state of the pipeline: reading, normalising, forward, blending, writing.

  Args:
    small: the 1x child's result ("seconds", "mpixels").
    large: the 4x child's result.
    small_bare_s: bare forward seconds of the 1x volume's tile batches.
    large_bare_s: likewise for the 4x volume.

  Returns:
    {"segment_mpixel_per_s", "bare_mpixel_per_s", "efficiency"}; None values (and a
    "note") when the 4x run was not slower than the 1x one (too small to measure).
  """
  mpixels = large["mpixels"] - small["mpixels"]
  seconds = large["seconds"] - small["seconds"]
  bare = large_bare_s - small_bare_s
  if seconds <= 0 or bare <= 0 or mpixels <= 0:
    return {
      "segment_mpixel_per_s": None,
      "bare_mpixel_per_s": None,
      "efficiency": None,
      "note": f"the 4x volume took {seconds:+.3f} s more than the 1x one: too small to measure",
    }
  return {
    "segment_mpixel_per_s": mpixels / seconds,
    "bare_mpixel_per_s": mpixels / bare,
    "efficiency": bare / seconds,
  }


def _shape_name(shape: tuple[int, ...]) -> str:
  return "x".join(str(v) for v in shape)


def measure_segmentation(options: Options, workdir: str) -> dict[str, Any]:
  """Segments a 1x and a 4x volume in fresh processes, and times the bare forward.

  Returns:
    The volumes, each child's result, the forward calls per shape, the bare forward's
    median per shape, `efficiency` and "rss_ratio" (peak RSS 4x / 1x).
  """
  z, y, x = options.segment_shape
  shapes = {"1x": (z, y, x), "4x": (4 * z, y, x)}
  children, counts = {}, {}
  spec = None
  for name, shape in shapes.items():
    root = os.path.join(workdir, f"segment_{name}.zarr")
    data_path.write_test_volume(root, shape, volume_lib.DEFAULT_CHUNK_YX, seed=1)
    spec = spec_for(options, root, os.path.join(workdir, f"segment_{name}_labels.zarr"))
    print(f"  segmenting {_shape_name(shape)} in a child process", file=sys.stderr, flush=True)
    children[name] = run_child(spec)
  model, variables = _model_and_variables(spec)
  predictor = infer.TilePredictor(
    model,
    variables,
    offset=[0.0] * len(CHANNELS),
    scale=[1.0] * len(CHANNELS),
    overlap=0,
    batch=spec["batch"],
  )
  for name, shape in shapes.items():
    counts[name] = tile_batches(shape, spec, predictor)
  del predictor
  bare_step_s = {}
  steps = max(options.steps, 3)
  rng = np.random.default_rng(0)
  for call_shape in sorted(set(counts["1x"]) | set(counts["4x"])):
    rows, ty, tx = call_shape
    image = rng.standard_normal((rows, spec["slices"], ty, tx, len(CHANNELS)), dtype=np.float32)
    forward = jax_side.JaxForward(spec["model"], image, variables=variables)
    bare_step_s[call_shape] = timing.race({"bare": forward}, steps, 1)["bare"]["step_s_median"]
    forward.close()
  small_bare = bare_seconds(counts["1x"], bare_step_s)
  large_bare = bare_seconds(counts["4x"], bare_step_s)
  return {
    "volumes": {k: list(v) for k, v in shapes.items()},
    "model": f"{spec['model']['name']}, {spec['slices']} slices, {'+'.join(spec['channels'])}",
    "children": children,
    "forward_calls": {k: {_shape_name(s): n for s, n in c.items()} for k, c in counts.items()},
    "bare_step_s": {_shape_name(s): t for s, t in bare_step_s.items()},
    "bare_s": {"1x": small_bare, "4x": large_bare},
    **efficiency(children["1x"], children["4x"], small_bare, large_bare),
    "rss_ratio": children["4x"]["peak_rss_mib"] / children["1x"]["peak_rss_mib"],
  }


def main(argv: list[str]) -> None:
  if len(argv) != 2:
    sys.exit("usage: python -m fibseg_jax.bench.segment_memory '<json spec>'")
  print(json.dumps(segment(json.loads(argv[1]))))


if __name__ == "__main__":
  main(sys.argv)
