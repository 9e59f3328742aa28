"""Fitted tiles (5af79a2) against tiles of the full --tile (the earlier release), 1 pass.

python fitted.py STACK [STACK ...]
"""

import json
import os
import sys
import time

from fibseg_jax import infer
from fibseg_jax.data import volume as volume_lib
from fibseg_jax.infer import tiling
from fibseg_jax.study import runs

ROOT = "/work/runs/regression_quick"
OUT = "/work/runs/segsettings/fitted"
fitted = tiling.fitted_tile


def unfitted(length, tile, overlap, size_multiple, min_tile=0):
  return min(tile, tiling.round_up(length, size_multiple))


for stack in sys.argv[1:]:
  for row in ("release", "previous"):
    for seed in (0, 1, 2):
      cell = os.path.join(ROOT, stack, f"{row}_s{seed}")
      settings = json.load(open(os.path.join(cell, "result.json")))["settings"]
      vol = volume_lib.open_volume(settings["volume"])
      ev = settings["eval_slices"]
      for tile in (256, 768):
        for mode, fn in (("fitted", fitted), ("full", unfitted)):
          path = os.path.join(OUT, stack, f"{row}_s{seed}_t{tile}_{mode}.json")
          if os.path.exists(path):
            continue
          os.makedirs(os.path.dirname(path), exist_ok=True)
          tiling.fitted_tile = fn
          out = path[:-5] + ".zarr"
          t0 = time.perf_counter()
          infer.segment_from_checkpoint(
            os.path.join(cell, "run"),
            vol,
            output=out,
            settings=infer.SegmentSettings(
              tile=tile,
              overlap=32 if tile == 256 else 64,
              batch=4 if tile == 256 else 2,
              tta=1,
              only_slices=ev,
              overwrite=True,
              progress=False,
            ),
          )
          secs = time.perf_counter() - t0
          lab = infer.open_array(out)
          s = runs.score(
            runs.read_truths(vol, ev),
            {int(z): lab[int(z)].read().result() for z in ev},
            vol.classes,
          )
          json.dump(
            {
              "stack": stack,
              "row": row,
              "seed": seed,
              "tile": tile,
              "mode": mode,
              "seconds": secs,
              "mean_iou": s["mean_iou"],
            },
            open(path, "w"),
          )
          print(stack, row, seed, tile, mode, round(s["mean_iou"], 4), f"{secs:.1f}s", flush=True)
  tiling.fitted_tile = fitted
