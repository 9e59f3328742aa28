"""Segmentation settings on the regression study's trained networks, per stack and seed.

  python run.py STACK [STACK ...]

For each seed's `release` network (lr 3e-3) and `previous` network (lr 1e-3, the earlier
release's defaults; training bitwise identical to that release's code, checked), segment the
evaluation slices with: today's default on CPU (tile 768, 1 pass), 2 passes, and the earlier
release's segment default (tile 512, batch 8, all 16 passes); score with the studies' metric.
"""

import json
import os
import sys
import time

from fibseg_jax import infer
from fibseg_jax.data import volume as volume_lib
from fibseg_jax.study import runs

ROOT = "/work/runs/regression_quick"
OUT = "/work/runs/segsettings"
VARIANTS = {
  "release": {"t768_p1": (768, 2, 1), "t768_p2": (768, 2, 2), "t512_p16": (512, 8, 16)},
  "previous": {"t768_p1": (768, 2, 1), "t512_p16": (512, 8, 16)},
}
for stack in sys.argv[1:]:
  for row, variants in VARIANTS.items():
    for seed in (0, 1, 2):
      cell = os.path.join(ROOT, stack, f"{row}_s{seed}")
      settings = json.load(open(os.path.join(cell, "result.json")))["settings"]
      vol = volume_lib.open_volume(settings["volume"]) if settings.get("volume") else None
      eval_slices = settings["eval_slices"]
      for name, (tile, batch, passes) in variants.items():
        result_path = os.path.join(OUT, stack, f"{row}_s{seed}_{name}.json")
        if os.path.exists(result_path):
          continue
        os.makedirs(os.path.dirname(result_path), exist_ok=True)
        output = os.path.join(OUT, stack, f"{row}_s{seed}_{name}.zarr")
        t0 = time.perf_counter()
        segmented = infer.segment_from_checkpoint(
          os.path.join(cell, "run"),
          vol,
          output=output,
          settings=infer.SegmentSettings(
            tile=tile,
            batch=batch,
            tta=passes,
            only_slices=eval_slices,
            overwrite=True,
            progress=False,
          ),
        )
        seconds = time.perf_counter() - t0
        labels = infer.open_array(output)
        pred = {int(z): labels[int(z)].read().result() for z in eval_slices}
        scored = runs.score(runs.read_truths(vol, eval_slices), pred, vol.classes)
        json.dump(
          {
            "stack": stack,
            "row": row,
            "seed": seed,
            "variant": name,
            "tile": tile,
            "batch": batch,
            "passes": passes,
            "seconds": seconds,
            "mean_iou": scored["mean_iou"],
            "per_class_iou": scored["per_class_iou"],
          },
          open(result_path, "w"),
          indent=1,
        )
        print(stack, row, seed, name, round(scored["mean_iou"], 4), f"{seconds:.1f} s", flush=True)
