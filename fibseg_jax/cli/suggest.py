r"""Ranks the slices nobody annotated by the model's uncertainty: which to annotate next.

  fibseg segment --workdir=runs/unet --input=vol.zarr --output=seg.zarr \
    --uncertainty=unc.zarr
  fibseg suggest --uncertainty=unc.zarr --volume=vol.zarr --out=suggest/
  fibseg suggest --probabilities=p_s0.zarr,p_s1.zarr,p_s2.zarr --volume=vol.zarr \
    --out=suggest/

Uncertainty = entropy of the blended class probabilities / log(classes), averaged over
each slice. Give exactly one of --uncertainty (`fibseg segment`'s per-voxel uncertainty array
[z, y, x], already that entropy; one byte a voxel) or --probabilities (its class
probability array [z, y, x, classes], whose entropy is computed here). Several
--probabilities arrays, comma-separated (one per ensemble member, e.g. `fibseg segment` run
with each seed's workdir), rank by the members' disagreement instead (mutual
information: the entropy of their mean minus their mean entropy), and each candidate
slice gets the expected narrowing of the phase fractions' range over the members. The
suggestions keep --min_gap slices from the annotated ones and from each other. Writes
suggest.json (every slice's score, the ranking), uncertainty_z.png (the profile along z,
annotated and suggested slices marked) and uncertainty_top.png (the suggested slices'
uncertainty maps). Annotated slices come from --volume's metadata (or --annotated) and
are left out of the ranking. Slices are numbered as the stack's files (as ingest read
them), in --annotated and in every line printed; each suggestion comes with its rank by
uncertainty, and a line says which more uncertain slice the spacing passed over and why.
"""

import os
import sys

from absl import flags

from fibseg_jax.cli import runner
from fibseg_jax.data import volume
from fibseg_jax.eval import uncertainty
from fibseg_jax.infer import store
from fibseg_jax.train import config as config_lib

_PROBABILITIES = flags.DEFINE_string(
  "probabilities",
  None,
  "`fibseg segment`'s --probabilities array [z, y, x, classes]; several, comma-separated, to rank "
  "by their disagreement.",
)
_UNCERTAINTY = flags.DEFINE_string(
  "uncertainty",
  None,
  "`fibseg segment`'s --uncertainty array [z, y, x] (instead of --probabilities).",
)
_VOLUME = flags.DEFINE_string("volume", None, "The segmented volume (its annotated slices).")
_ANNOTATED = flags.DEFINE_string(
  "annotated",
  None,
  "Annotated slices (numbers of their files) instead of --volume's, e.g. 5,11,17.",
)
_OUT = flags.DEFINE_string("out", None, "Output directory.")
_TOP = flags.DEFINE_integer("top", 3, "How many slices to suggest.")
_MIN_GAP = flags.DEFINE_integer(
  "min_gap",
  None,
  "Smallest distance along z between a suggestion and an annotated or another suggested "
  "slice; default max(2, depth / (2 (annotated + top))).",
)


def main(argv):
  if len(argv) > 1:
    sys.exit(f"error: unexpected arguments {argv[1:]}")
  given = [flag for flag in (_UNCERTAINTY, _PROBABILITIES) if flag.value]
  if len(given) != 1:
    sys.exit(
      "error: give exactly one of --uncertainty=unc.zarr or --probabilities=probs.zarr "
      "(`fibseg segment`'s outputs)"
      + (f"; got both {given[0].value} and {given[1].value}" if len(given) == 2 else "")
    )
  if not _OUT.value:
    sys.exit("error: --out is required")
  try:
    classes = None
    source = given[0].value
    if given[0] is _PROBABILITIES and "," in source:
      source = [p for p in source.split(",") if p]
    if _VOLUME.value:
      vol = volume.open_volume(_VOLUME.value)
      annotated, classes = vol.metadata.annotated_slices, vol.classes
      numbering = vol.metadata.numbering
    else:
      numbering = _numbering(source if isinstance(source, str) else source[0])
    if _ANNOTATED.value is not None:
      numbers = config_lib.parse_ints(_ANNOTATED.value, "--annotated")
      annotated = (
        numbering.to_zs(numbers, f"--annotated={_ANNOTATED.value}") if numbering else numbers
      )
    elif not _VOLUME.value:
      sys.exit("error: give --volume=vol.zarr (or --annotated=5,11,17) to leave out annotated")
    if _MIN_GAP.value is not None and _MIN_GAP.value < 1:
      sys.exit(f"error: --min_gap={_MIN_GAP.value}: expected an integer >= 1")
    document = uncertainty.suggest(
      source,
      _OUT.value,
      annotated=annotated,
      top=_TOP.value,
      kind=given[0].name,
      min_gap=_MIN_GAP.value,
      classes=classes,
      numbering=numbering,
    )
  except (ValueError, store.OutputError, volume.VolumeError) as e:
    sys.exit(f"error: {e}")
  depth = len(document["slice_uncertainty"])
  for line in explain(document, numbering or volume.SliceNumbers.of((), depth)):
    print(line)
  print(f"wrote {os.path.join(_OUT.value, 'suggest.json')}, uncertainty_z.png, uncertainty_top.png")


_SKIPPED_SHOWN = 5  # skipped slices printed; suggest.json lists them all


def _numbering(source: str) -> volume.SliceNumbers | None:
  """The slice numbers of the volume that `fibseg segment` wrote `source` from; None
  when `source` cannot be opened (`uncertainty.suggest` then says why)."""
  try:
    seg = store.open_segmentation(source)
  except (store.OutputError, ValueError):
    return None
  return volume.slice_numbering(seg.source, seg.shape[0])


def explain(document: dict, numbering: volume.SliceNumbers) -> list[str]:
  """The printed lines: each suggestion with its rank by uncertainty, then each more
  uncertain slice the spacing passed over, and the slice it was too close to."""
  label = numbering.label
  rows = {row["z"]: row for row in document["ranking"]}
  candidates = len(document["ranking"])
  explanation = document["explanation"]
  lines = [
    f"{candidates} slices without labels ranked by uncertainty (1 = most uncertain); "
    f"suggestions keep at least {document['min_gap']} slices (--min_gap) from the "
    "annotated slices and from each other"
  ]
  if not document["suggested"]:
    lines.append("no slice to suggest: every slice is annotated")
  for i, entry in enumerate(explanation["suggested"], 1):
    z, rank = entry["z"], entry["rank"]
    row = rows[z]
    line = (
      f"{i}. slice {label(z)}: uncertainty {row['uncertainty']:.4f}, rank {rank} of {candidates}"
    )
    if rank > 1 and rank > candidates / 2:
      line += (
        " (among the least uncertain: every more uncertain slice is too close to an "
        "annotated or a suggested one)"
      )
    if "expected_narrowing" in row:
      line += "; narrows the phase-fraction ranges by " + ", ".join(
        f"{name} {100 * v:.2f} pp" for name, v in row["expected_narrowing"].items()
      )
    lines.append(line)
  skipped = explanation["skipped"]
  for entry in skipped[:_SKIPPED_SHOWN]:
    what = "annotated" if entry["near_annotated"] else "suggested"
    lines.append(
      f"   skipped slice {label(entry['z'])} (rank {entry['rank']}): {entry['distance']} "
      f"from {what} slice {label(entry['near'])}, closer than --min_gap="
      f"{document['min_gap']}"
    )
  if len(skipped) > _SKIPPED_SHOWN:
    lines.append(f"   ... and {len(skipped) - _SKIPPED_SHOWN} more skipped (suggest.json)")
  return lines


def run(argv: list[str] | None = None) -> None:
  """`fibseg suggest`: `main` under absl (see `runner.run_module`)."""
  runner.run_module(sys.modules[__name__], argv)
