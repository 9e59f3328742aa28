r"""Generates a synthetic dual-detector PFIB-SEM stack of cement paste with known truth.

  fibseg make-synthetic --out=synth_tiff --shape=16,512,512 --seed=0 \
    --annotate=3,7,11,9
  fibseg make-synthetic --out=synth.zarr --format=zarr --curtaining=0

--format=tiff writes what an instrument would (`DIR/ICE/slice_0000.tif`, `DIR/TLD/...`,
label TIFFs in `DIR/labels/` only for the annotated slices, `DIR/stack.json`) plus
`DIR/preview.png`; ingest it with `fibseg ingest`. --format=zarr writes a volume
directly and the preview beside it as `<out>.preview.png`. Each artifact severity is
0 (off) to 1 (default) or more. The output is written to a temporary path and renamed on
success, so a failure leaves nothing.
"""

import os
import sys

from absl import flags

from fibseg_jax.cli import runner
from fibseg_jax.data import synth, volume

_OUT = flags.DEFINE_string(
  "out",
  None,
  "Output: a directory for --format=tiff, a volume root for --format=zarr (local path, "
  "memory://, gs://, s3://). The preview PNG goes to OUT/preview.png (tiff) or "
  "OUT.preview.png beside a local zarr volume.",
)
_SHAPE = flags.DEFINE_string("shape", "16,512,512", "Stack shape z,y,x in voxels.")
_SEED = flags.DEFINE_integer("seed", 0, "Random seed; the same flags give the same stack.")
_ANNOTATE = flags.DEFINE_list(
  "annotate",
  ["3", "7", "11", "9"],
  "Slice indices whose labels are written (0-based), or `all` (the truth of every slice, "
  "e.g. for `fibseg effort`).",
)
_FORMAT = flags.DEFINE_enum("format", "tiff", ["tiff", "zarr"], "Output format.")
_VOXEL = flags.DEFINE_string("voxel_size_nm", "50,25,25", "Voxel size z,y,x in nm.")
_CURTAINING = flags.DEFINE_float("curtaining", 1.0, "Milling-curtain severity (0 = off).")
_SHADING = flags.DEFINE_float(
  "shading", 1.0, "Detector occlusion-shadow and gain-gradient severity (0 = off)."
)
_NOISE = flags.DEFINE_float("noise", 1.0, "Shot and read noise severity (0 = off).")
_SHINE = flags.DEFINE_float("shine_through", 1.0, "Pore shine-through severity (0 = off).")
_DRIFT = flags.DEFINE_float(
  "drift",
  0.0,
  "Growth of every artifact severity along z: the last slice gets (1 + drift) x the first "
  "one's (0 = alike slices). A stack whose slices differ, e.g. for `fibseg suggest`.",
)
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "Replace an existing --out.")
_PROGRESS = flags.DEFINE_bool(
  "progress", True, "Show progress bars on stacks large enough to take a while (--noprogress)."
)

# Show progress bars only where generating takes noticeable time.
_PROGRESS_VOXELS = 1 << 22


def _parse_ints(flag: str, value: str, count: int, example: str) -> tuple[int, ...]:
  try:
    parsed = tuple(int(v) for v in value.split(","))
  except ValueError:
    parsed = ()
  if len(parsed) != count:
    sys.exit(f"error: --{flag}={value}: expected {count} comma-separated integers, e.g. {example}")
  return parsed


def _parse_voxel_size(value: str) -> tuple[float, ...]:
  try:
    parsed = tuple(float(v) for v in value.split(","))
  except ValueError:
    parsed = ()
  if len(parsed) != 3 or min(parsed) <= 0:
    sys.exit(f"error: --voxel_size_nm={value}: expected 3 positive numbers z,y,x, e.g. 50,25,25")
  return parsed


def _preview_path(out: str, fmt: str) -> str | None:
  if fmt == "tiff":
    return os.path.join(out, "preview.png")
  local = volume.local_path(out)
  return None if local is None else local + ".preview.png"


def main(argv):
  if len(argv) > 1:
    sys.exit(f"error: unexpected arguments {argv[1:]}")
  if not _OUT.value:
    sys.exit("error: --out is required, e.g. --out=synth_tiff (tiff) or --out=synth.zarr (zarr)")
  shape = _parse_ints("shape", _SHAPE.value, 3, "16,512,512")
  try:
    annotate = (
      list(range(shape[0])) if _ANNOTATE.value == ["all"] else [int(z) for z in _ANNOTATE.value]
    )
  except ValueError:
    sys.exit(f"error: --annotate={','.join(_ANNOTATE.value)}: expected slice indices, e.g. 3,7,11")
  try:
    config = synth.SynthConfig(
      shape=shape,
      voxel_size_nm=_parse_voxel_size(_VOXEL.value),
      seed=_SEED.value,
      curtaining=_CURTAINING.value,
      shading=_SHADING.value,
      noise=_NOISE.value,
      shine_through=_SHINE.value,
      drift=_DRIFT.value,
    )
  except ValueError as e:
    # The config names the field, which is the flag of the same name.
    sys.exit(f"error: --{e}")
  if any(not 0 <= z < shape[0] for z in annotate):
    sys.exit(
      f"error: --annotate={','.join(map(str, annotate))}: slice indices must lie in "
      f"0..{shape[0] - 1} for --shape={_SHAPE.value}"
    )
  out = _OUT.value
  preview = _preview_path(out, _FORMAT.value)
  # Check the destination before spending time generating.
  if _FORMAT.value == "tiff" or volume.local_path(out) is not None:
    try:
      synth.check_destination(out, tiff=_FORMAT.value == "tiff", overwrite=_OVERWRITE.value)
    except ValueError as e:
      sys.exit(f"error: {e}")
  progress = _PROGRESS.value and shape[0] * shape[1] * shape[2] >= _PROGRESS_VOXELS
  stack = synth.generate(config, progress=progress)
  try:
    if _FORMAT.value == "tiff":
      synth.write_tiff_folders(stack, out, annotate, overwrite=_OVERWRITE.value, progress=progress)
    else:
      synth.write_volume(stack, out, annotate, overwrite=_OVERWRITE.value, progress=progress)
  except ValueError as e:
    sys.exit(f"error: {e}")
  preview_z = sorted(annotate)[0] if annotate else shape[0] // 2
  if preview is not None:
    synth.save_preview(stack, preview_z, preview, name=out)
  z, y, x = shape
  print(
    f"wrote {out} ({_FORMAT.value}): {z} slices of {y} x {x}, channels {list(synth.CHANNELS)}, "
    f"classes {list(synth.CLASSES)}, voxel {list(config.voxel_size_nm)} nm, "
    f"annotated slices {sorted(set(annotate))}"
  )
  if preview is not None:
    print(f"wrote {preview} (slice {preview_z}: ICE | TLD | truth)")


def run(argv: list[str] | None = None) -> None:
  """`fibseg make-synthetic`: `main` under absl (see `runner.run_module`)."""
  runner.run_module(sys.modules[__name__], argv)
