r"""Turns folders of per-slice detector images and a few labelled slices into a volume.

  fibseg ingest --channel=ICE='data/ice/*.tif' \
    --channel=TLD='data/tld/*.tif' --labels='data/labels/*.tif' \
    --classes=pore,csh,portlandite,clinker --voxel_size_nm=50,25,25 --out=vol.zarr

Slices are ordered by the last integer in each file name; a label file belongs to the
image slice with the same number (255 = not annotated, classes 0, 1, ...; with
--labels_unlabelled=0, 0 = not painted and classes 1, 2, ..., as napari and ilastik write
them; indexed-colour PNGs give their indices). Label files may cover any subset of the
slices (e.g. every 10th) and may hold only strokes. A channel, or the labels, may also be
a single multi-page TIFF. A jump in the image numbering (1, 2, 4) is refused unless
--allow_missing_slices. The volume is written to a temporary path and renamed on success.
"""

import sys

from absl import flags

from fibseg_jax.cli import runner
from fibseg_jax.data import ingest, volume

_CHANNEL = flags.DEFINE_multi_string(
  "channel", [], "NAME=GLOB of one detector signal, in order, e.g. ICE='data/ice/*.tif'."
)
_LABELS = flags.DEFINE_string(
  "labels", None, "Glob of label images (TIFF/PNG of class indices, 255 = not annotated)."
)
_UNLABELLED = flags.DEFINE_enum(
  "labels_unlabelled",
  "255",
  ["255", "0"],
  "Label value meaning 'not annotated': 255 (classes 0..K-1) or 0 (classes 1..K, as napari "
  "and ilastik label layers paint them). The volume written is the same either way.",
)
_CLASSES = flags.DEFINE_list(
  "classes",
  None,
  "Class names, one per label value 0, 1, ... (1, 2, ... with --labels_unlabelled=0); "
  "default class0, class1, ...",
)
_VOXEL = flags.DEFINE_list("voxel_size_nm", None, "Voxel size z,y,x in nm, e.g. 50,25,25.")
_OUT = flags.DEFINE_string("out", None, "Output volume (a directory, or memory://, gs://, s3://).")
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "Replace an existing --out.")
_PROGRESS = flags.DEFINE_bool("progress", True, "Show a progress bar (--noprogress: none).")
_ALLOW_MISSING = flags.DEFINE_bool(
  "allow_missing_slices", False, "Stack the slices as numbered even where numbers are missing."
)


def _parse_channels(values: list[str]) -> dict[str, str]:
  channels = {}
  for value in values:
    name, sep, pattern = value.partition("=")
    if not sep or not name or not pattern:
      sys.exit(f"error: --channel={value}: expected NAME=GLOB, e.g. ICE='data/ice/*.tif'")
    if name in channels:
      sys.exit(f"error: --channel={name} given twice")
    channels[name] = pattern
  return channels


def _parse_voxel_size(values: list[str] | None) -> tuple[float, float, float]:
  if not values:
    sys.exit("error: --voxel_size_nm is required: z,y,x in nm, e.g. 50,25,25")
  try:
    size = tuple(float(v) for v in values)
  except ValueError:
    size = ()
  if len(size) != 3 or min(size) <= 0:
    sys.exit(f"error: --voxel_size_nm={','.join(values)}: expected 3 positive numbers z,y,x")
  return size


def main(argv):
  if len(argv) > 1:
    sys.exit(f"error: unexpected arguments {argv[1:]}")
  if not _OUT.value:
    sys.exit("error: --out is required: where to write the volume, e.g. --out=vol.zarr")
  channels = _parse_channels(_CHANNEL.value)
  voxel_size = _parse_voxel_size(_VOXEL.value)
  try:
    plan = ingest.plan_ingest(
      channels, _LABELS.value, _CLASSES.value, allow_missing_slices=_ALLOW_MISSING.value
    )
    meta = ingest.ingest(
      plan,
      _OUT.value,
      voxel_size_nm=voxel_size,
      overwrite=_OVERWRITE.value,
      progress=_PROGRESS.value,
      # Not stated: 255, unless the labels look painted with 0 = not painted.
      unlabelled=int(_UNLABELLED.value) if flags.FLAGS["labels_unlabelled"].present else None,
      warn=lambda message: print(f"warning: {message}", file=sys.stderr),
    )
  except (ingest.IngestError, volume.VolumeError) as e:
    sys.exit(f"error: {e}")
  z, y, x = meta.shape
  numbering = meta.numbering
  print(
    f"wrote {_OUT.value}: {z} slices of {y} x {x} (numbered {numbering.describe()}, as "
    f"their files), channels {list(meta.channels)}, classes {list(meta.classes)}, "
    f"annotated slices {numbering.labels(meta.annotated_slices)}"
  )


def run(argv: list[str] | None = None) -> None:
  """`fibseg ingest`: `main` under absl (see `runner.run_module`)."""
  runner.run_module(sys.modules[__name__], argv)
