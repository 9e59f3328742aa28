"""How fast and how lean fibseg_jax is, against MONAI and against its own targets.

  from fibseg_jax import bench
  result = bench.run(bench.make_options(quick=True))
  bench.report.write(result, "bench/")     # benchmark.json, BENCHMARKS.md
  print(bench.report.key_table(result))

`experiments/benchmark.py` is the command line. The headline keys (`figures.KEYS`), all
present in every run (None with a note when a figure cannot be measured):

  train_speedup_vs_monai, infer_speedup_vs_monai   MONAI median step / fibseg_jax's
  train_flop_utilisation   XLA cost-analysis FLOP/s of the train step / matmul FLOP/s
  loader_headroom          slab loader patches/s / what a train step consumes
  loader_headroom_full_recipe   the same with every augmentation part on
  segment_efficiency       segmentation Mpixel/s / the bare forward's on the same tiles
  segment_rss_ratio        peak RSS segmenting a 4x volume / a 1x volume
  sensor3d_step_ratio      Sensor-3D train step / U-Net's, same batch and slab
  step_s_<config>          median train step of each study configuration

Modules: `options` (flags, presets, study), `timing` (clocks, alternating races),
`machine` (environment, memory), `jax_side` and `peer` (the two frameworks' steps),
`data_path` (slab loader), `segment_memory` (segmentation children), `figures` (keys,
targets, ratios), `benchmark` (the run), `report` (outputs). This package sits at the top
of the import chain: it imports data, models, train and infer. PyTorch and MONAI are the
optional `bench` extra.
"""

from fibseg_jax.bench import figures, report
from fibseg_jax.bench.benchmark import run
from fibseg_jax.bench.figures import KEY_NAMES, KEYS
from fibseg_jax.bench.options import (
  STUDY,
  BenchmarkError,
  Options,
  check_options,
  make_options,
  parse_ints,
)

__all__ = [
  "KEYS",
  "KEY_NAMES",
  "STUDY",
  "BenchmarkError",
  "Options",
  "check_options",
  "figures",
  "make_options",
  "parse_ints",
  "report",
  "run",
]
