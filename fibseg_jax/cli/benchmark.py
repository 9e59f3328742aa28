r"""Benchmarks fibseg_jax against MONAI and against its targets (`fibseg_jax.bench`).

  make bench   # pip install torch==2.13.0 monai==1.6.1 psutil, then the full run into bench/
  fibseg bench --out=bench/ --quick          # within 10 min on 2 cores
  fibseg bench --out=bench/ --peer=none --steps=20

Writes OUT/benchmark.json (every key, the targets, the detailed measurements) and
OUT/BENCHMARKS.md (machine, versions, command, load, tables), and prints one table with
each figure next to its target. Without torch and monai, or with --peer=none, the two
MONAI speedups are null and the table says why.
"""

import os

# Before jax is imported: on GPU, do not let XLA take 75% of the memory torch needs too.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import sys  # noqa: E402

from absl import flags  # noqa: E402

from fibseg_jax import bench, outputs  # noqa: E402
from fibseg_jax.cli import runner

_OUT = flags.DEFINE_string("out", None, "Directory for benchmark.json and BENCHMARKS.md.")
_QUICK = flags.DEFINE_bool("quick", False, "Smaller shapes and fewer steps (< 10 min, 2 cores).")
_PEER = flags.DEFINE_enum("peer", "monai", ["monai", "none"], "PyTorch peer to race.")
_DTYPE = flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "Compute dtype.")
_BATCH = flags.DEFINE_integer("batch", None, "Training batch (full 8, quick 4).")
_SIZE = flags.DEFINE_integer("size", None, "Training patch y = x (full 256, quick 128).")
_STEPS = flags.DEFINE_integer("steps", None, "Timed repetitions (full 10, quick 3).")
_WARMUP = flags.DEFINE_integer("warmup", None, "Untimed repetitions after compiling (2, 1).")
_TORCH_THREADS = flags.DEFINE_integer("torch_threads", None, "torch threads; 0 = usable cores.")
_LOADER_SHAPE = flags.DEFINE_list("loader_shape", None, "z,y,x of the loader's volume.")
_LOADER_CHUNKS = flags.DEFINE_list("loader_chunks", None, "Chunk y-x sizes to compare.")
_LOADER_BATCHES = flags.DEFINE_integer("loader_batches", None, "Timed loader batches.")
_SEGMENT_SHAPE = flags.DEFINE_list("segment_shape", None, "z,y,x of the 1x segmented volume.")
_SEGMENT_TILE = flags.DEFINE_integer("segment_tile", None, "Segmentation tile side.")
_SEGMENT_OVERLAP = flags.DEFINE_integer("segment_overlap", None, "Segmentation tile overlap.")
_SEGMENT_BATCH = flags.DEFINE_integer("segment_batch", None, "Tiles per forward call.")
_SEGMENT_BLOCK = flags.DEFINE_integer("segment_block", None, "Segmentation block side.")
_MATMUL_SIZE = flags.DEFINE_integer("matmul_size", None, "n of the n x n matmul reference.")


def main(argv):
  if len(argv) > 1:
    sys.exit(f"error: unexpected arguments {argv[1:]}")
  if not _OUT.value:
    sys.exit("error: --out is required, e.g. --out=bench/")
  try:
    os.makedirs(_OUT.value, exist_ok=True)  # fail before an hour of measuring, not after
  except OSError as e:
    sys.exit(f"error: --out={_OUT.value}: cannot create the directory ({e.strerror})")
  try:
    bench.report.claim(_OUT.value)  # before the long run, not after it
    options = bench.make_options(
      quick=_QUICK.value,
      peer=_PEER.value,
      dtype=_DTYPE.value,
      batch=_BATCH.value,
      size=_SIZE.value,
      steps=_STEPS.value,
      warmup=_WARMUP.value,
      torch_threads=_TORCH_THREADS.value,
      loader_shape=bench.parse_ints(_LOADER_SHAPE.value, "loader_shape", 3),
      loader_chunks=bench.parse_ints(_LOADER_CHUNKS.value, "loader_chunks"),
      loader_batches=_LOADER_BATCHES.value,
      segment_shape=bench.parse_ints(_SEGMENT_SHAPE.value, "segment_shape", 3),
      segment_tile=_SEGMENT_TILE.value,
      segment_overlap=_SEGMENT_OVERLAP.value,
      segment_batch=_SEGMENT_BATCH.value,
      segment_block=_SEGMENT_BLOCK.value,
      matmul_size=_MATMUL_SIZE.value,
    )
    result = bench.run(options)
  except (bench.BenchmarkError, outputs.OutputError) as e:
    sys.exit(f"error: {e}")
  paths = bench.report.write(result, _OUT.value)
  print(bench.report.key_table(result))
  print(f"\nwrote {' and '.join(paths)}")


def run(argv: list[str] | None = None) -> None:
  """`fibseg bench`: `main` under absl (see `runner.run_module`)."""
  runner.run_module(sys.modules[__name__], argv)
