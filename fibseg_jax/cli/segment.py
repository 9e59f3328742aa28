r"""Segments every slice of a volume with a trained model.

  fibseg segment --workdir=runs/s3d --input=vol.zarr --output=seg.zarr \
    [--probabilities=probs.zarr] [--uncertainty=unc.zarr] [--tile=768] [--overlap=64] \
    [--batch=2] [--dtype=bfloat16] [--tta=auto|off|2|4|8|all] [--slices=10-20]
  fibseg segment --workdir=runs/s0 --workdir=runs/s1 --workdir=runs/s2 ...

Test-time augmentation: --tta=auto (default) averages over every transform of a tile
on a GPU/TPU and over `infer.settings.AUTO_PASSES["cpu"]` of them on CPU; --tta=off (or
--notta), 2, 4, 8 or all choose.
--output is a zarr v3 array [z, y, x] uint8 (label i = class i, named in its attributes);
--probabilities a second one [z, y, x, classes] uint8 = round(255 * p);
--uncertainty a third [z, y, x] uint8 = round(255 * entropy(p) / log(classes)), 0 =
certain, 255 = uniform (what `fibseg suggest` ranks slices by).
When every block is done, --format=zarr (default) also writes an OME-Zarr (NGFF 0.5)
label image for napari / neuroglancer (seg.ome.zarr next to seg.zarr), --format=tiff a
TIFF stack for Fiji / Dragonfly / Avizo (seg.tif); in both, value = class + 1, 0 = none.
Memory stays bounded whatever the stack size. Rerunning after an interruption resumes
where it stopped; with several processes, each segments its own share of the blocks:
--distributed on a cluster JAX detects (SLURM, TPU pods, ...), or by hand on every host
--coordinator_address=HOST:PORT --num_processes=N --process_id=I.
"""

import os
import sys

import jax
from absl import flags, logging
from tqdm import tqdm

from fibseg_jax import checkpoint, infer
from fibseg_jax.cli import runner
from fibseg_jax.data import volume
from fibseg_jax.eval import report as evaluation
from fibseg_jax.infer import export
from fibseg_jax.train import config as config_lib
from fibseg_jax.train import parallel

_WORKDIR = flags.DEFINE_multi_string(
  "workdir",
  None,
  "Training workdir; its best checkpoint is used. Give it several times to average the "
  "models' probabilities (a seed or checkpoint ensemble).",
)
_CHECKPOINT = flags.DEFINE_string(
  "checkpoint", None, "A checkpoint step directory (or checkpoints/ dir) instead of --workdir."
)
_INPUT = flags.DEFINE_string("input", None, "Volume to segment (`fibseg ingest` output).")
_OUTPUT = flags.DEFINE_string("output", None, "Label array to write, e.g. seg.zarr.")
_PROBABILITIES = flags.DEFINE_string(
  "probabilities", None, "Optional per-class probability array to write, e.g. probs.zarr."
)
_UNCERTAINTY = flags.DEFINE_string(
  "uncertainty",
  None,
  "Optional per-voxel uncertainty array to write, e.g. unc.zarr: round(255 * entropy of the "
  "class probabilities / log(classes)), 0 = certain, 255 = uniform.",
)
_TILE = flags.DEFINE_integer(
  "tile",
  infer.settings.DEFAULT_TILE,
  "Largest tile side in pixels (a multiple of 2**depth); tiles shrink to fit each block.",
)
_OVERLAP = flags.DEFINE_integer(
  "overlap", infer.settings.DEFAULT_OVERLAP, "Overlap of neighbouring tiles in pixels."
)
_BATCH = flags.DEFINE_integer(
  "batch",
  infer.settings.DEFAULT_BATCH,
  "Tiles per device step (over all local devices); raise it on a GPU.",
)
_BLOCK = flags.DEFINE_integer(
  "block",
  infer.settings.DEFAULT_BLOCK,
  "Output block side in pixels (unit of work and of resuming).",
)
_DTYPE = flags.DEFINE_enum(
  "dtype",
  None,
  list(infer.settings.COMPUTE_DTYPES),
  "Compute dtype instead of the training one; bfloat16 is for GPUs/TPUs (parameters stay "
  "float32; on CPU it is no faster).",
)
_TTA = flags.DEFINE_string(
  "tta",
  "auto",
  "Test-time augmentation: how many transforms of each tile are averaged over, one of "
  f"{', '.join(infer.settings.TTA_VALUES)}: 1 = off, 2 = the x flip, 4 = the flips, 8 = "
  "flips and quarter turns, all = those and the slab reversed (16 for a slab). auto: all "
  "on a GPU/TPU, on CPU the count that pays best (see BUILD_NOTES, 'TTA pass curve'). "
  "Each pass is one more forward pass.",
)
_NOTTA = flags.DEFINE_bool("notta", False, "Same as --tta=off.")
_SLICES = flags.DEFINE_string(
  "slices",
  None,
  "Segment only these slices, by the numbers of their files, e.g. 20 or 10-20 or 3,9 "
  "(default: all).",
)
_PROGRESS = flags.DEFINE_bool("progress", True, "Show a progress bar (--noprogress: none).")
_WINDOW = flags.DEFINE_enum("window", "cosine", ["cosine", "gaussian"], "Blending window.")
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "Replace existing output arrays.")
_FORMAT = flags.DEFINE_enum(
  "format", "zarr", list(export.FORMATS), "Export for other tools: OME-Zarr, TIFF stack or none."
)
_EXPORT = flags.DEFINE_string(
  "export", None, "Export path (default: --output with .ome.zarr or .tif for .zarr)."
)
_DISTRIBUTED = flags.DEFINE_bool(
  "distributed", False, "Call jax.distributed.initialize() (multi-host: SLURM, TPU pods, ...)."
)
_COORDINATOR = flags.DEFINE_string(
  "coordinator_address", None, "host:port of process 0, for processes started by hand."
)
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Number of processes.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "Index of this process.")


def main(argv):
  if len(argv) > 1:
    sys.exit(f"error: unexpected arguments {argv[1:]}")
  if bool(_WORKDIR.value) == bool(_CHECKPOINT.value):
    sys.exit("error: give exactly one of --workdir=runs/NAME or --checkpoint=PATH")
  for flag in (_INPUT, _OUTPUT):
    if not flag.value:
      sys.exit(f"error: --{flag.name} is required")
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.ERROR)  # orbax logs every step of a restore at INFO
  model_paths = _WORKDIR.value or [_CHECKPOINT.value]
  which = "--workdir" if _WORKDIR.value else "--checkpoint"
  for model_path in model_paths:
    if not os.path.exists(model_path):
      sys.exit(f"error: {which}={model_path}: no such directory")
  for flag in (_OUTPUT, _PROBABILITIES, _UNCERTAINTY, _EXPORT):
    local = volume.local_path(flag.value) if flag.value else None
    if local and not os.path.isdir(os.path.dirname(local)):
      sys.exit(
        f"error: --{flag.name}={flag.value}: parent directory {os.path.dirname(local)} does "
        "not exist; create it first"
      )
  try:
    only_slices = evaluation.parse_slices(_SLICES.value) or None
    if only_slices:  # the user's slice numbers (those of the files) -> z
      numbering = volume.open_volume(_INPUT.value, check_labels=False).metadata.numbering
      only_slices = numbering.to_zs(only_slices, "--slices")
  except volume.VolumeError as e:
    sys.exit(f"error: {e}" if str(e).startswith("--") else f"error: --input: {e}")
  except ValueError as e:
    sys.exit(f"error: {e}")
  tta = _TTA.value
  try:
    passes = infer.settings.parse_tta(tta)
  except infer.InferenceError as e:
    sys.exit(f"error: {e}")
  if _NOTTA.value:
    if flags.FLAGS["tta"].present and passes != 1:
      sys.exit(f"error: --notta and --tta={tta} disagree; give one of them")
    tta = "off"
  export_path = _EXPORT.value or export.default_path(_OUTPUT.value, _FORMAT.value)
  try:
    export.check_path(
      export_path,
      _FORMAT.value,
      overwrite=_OVERWRITE.value,
      labels=infer.store.source_id(_OUTPUT.value),
      flag="--export" if _EXPORT.value else f"--output's {_FORMAT.value} export",
      source=_INPUT.value,
    )
  except infer.OutputError as e:
    sys.exit(f"error: {e}")
  try:
    if _COORDINATOR.value or _NUM_PROCESSES.value or _PROCESS_ID.value is not None:
      parallel.initialize_distributed(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
    elif _DISTRIBUTED.value:
      jax.distributed.initialize()
  except config_lib.ConfigError as e:
    sys.exit(f"error: {e}")
  try:
    result = infer.segment_from_checkpoint(
      model_paths,
      _INPUT.value,
      output=_OUTPUT.value,
      probabilities=_PROBABILITIES.value,
      uncertainty=_UNCERTAINTY.value,
      settings=infer.SegmentSettings(
        tile=_TILE.value,
        overlap=_OVERLAP.value,
        batch=_BATCH.value,
        block=_BLOCK.value,
        window=_WINDOW.value,
        tta=tta,
        only_slices=only_slices,
        dtype=_DTYPE.value,
        overwrite=_OVERWRITE.value,
        progress=_PROGRESS.value,
      ),
    )
  except checkpoint.CheckpointError as e:
    sys.exit(f"error: {which}: {e}")
  except volume.VolumeError as e:
    sys.exit(f"error: --input: {e}")
  except infer.InferenceError as e:
    sys.exit(f"error: {e}")
  try:
    exported = export.export_when_complete(
      _OUTPUT.value, _FORMAT.value, export_path, overwrite=_OVERWRITE.value
    )
  except infer.OutputError as e:
    sys.exit(f"error: {e}")
  if result.blocks_skipped:
    print(f"resumed: {result.blocks_skipped} of {result.blocks_assigned} blocks were done")
  if jax.process_count() > 1:
    print(
      f"process {jax.process_index()} of {jax.process_count()}: segmented "
      f"{result.blocks_done} of its {result.blocks_assigned} blocks "
      f"({result.blocks_total} in all)"
    )
  logging.info("segmented blocks (z.y0.x0): %s", " ".join(result.segmented))
  rate = tqdm.format_sizeof(result.mpixels * 1e6 / max(result.seconds, 1e-9))
  print(f"segmented {result.mpixels:.2f} Mpixel in {result.seconds:.1f} s ({rate}px/s)")
  print(f"labels:        {result.output}")
  if result.probabilities:
    print(f"probabilities: {result.probabilities}")
  if result.uncertainty:
    print(f"uncertainty:   {result.uncertainty}")
  if exported:
    print(f"{_FORMAT.value + ' export:':<15}{exported}")
  if not result.complete:
    print("other processes are still segmenting their blocks")


def run(argv: list[str] | None = None) -> None:
  """`fibseg segment`: `main` under absl (see `runner.run_module`)."""
  runner.run_module(sys.modules[__name__], argv)
