r"""Scores a segmented stack against hand labels and writes a report with figures.

  fibseg evaluate --prediction=seg.zarr --truth=vol.zarr --slices=9 \
    --out=report/
  fibseg evaluate --prediction=seg.zarr --truth='labels/*.tif' --out=report/

--truth is a volume (its labels) or a glob of label images (slice number = last integer
in the file name; 255 = not annotated, or with --labels_unlabelled=0 0 = not painted and
classes from 1, as `fibseg ingest` reads them). Slices are numbered as the stack's files
(as ingest read them), in --slices, the printed lines and the report's file names.
--slices defaults to every labelled slice.
Writes report.json, report.md, slice_NNNN.png (channels | truth | prediction | error
map), fractions_z.png (predicted phase fractions along z), structure.png (per phase:
largest connected cluster, percolation, surface density) and pore_sizes.png (local
thickness distribution), the last two on the whole stack if it has at most
--max_voxels voxels, else on a centred subvolume that the report names. With
--members=seg_s1.zarr,seg_s2.zarr (other segmentations of the stack: each ensemble
member's), every structure quantity also gets its range over them: an interval that
shows how much the number depends on the model. When --truth is the labelled volume and
each member records its training checkpoint, the volume fractions are calibrated
instead: corrected by the errors measured on the held-out validation blocks, with a
bootstrap 95% interval (`fibseg_jax.eval.calibration`).
"""

import sys

from absl import flags

from fibseg_jax import eval as evaluation
from fibseg_jax.cli import runner
from fibseg_jax.eval import quantify

_PREDICTION = flags.DEFINE_string("prediction", None, "Label array from `fibseg segment --output`.")
_TRUTH = flags.DEFINE_string("truth", None, "Volume with labels, or a glob of label images.")
_SLICES = flags.DEFINE_string(
  "slices", None, "Slice numbers (those of the files) to score, e.g. 9 or 9,40 or 1-10."
)
_UNLABELLED = flags.DEFINE_enum(
  "labels_unlabelled",
  None,
  ["255", "0"],
  "For a glob --truth: the label value meaning 'not annotated', 255 (classes 0..K-1) or 0 "
  "(classes 1..K, as napari and ilastik paint them), as for `fibseg ingest`.",
)
_OUT = flags.DEFINE_string("out", None, "Report directory, e.g. report/.")
_IMAGE = flags.DEFINE_string(
  "image", None, "Volume whose channels the figures show (default: --truth or the source)."
)
_STRUCTURE = flags.DEFINE_bool(
  "structure", True, "Quantify connectivity, surface density and pore sizes per phase."
)
_MAX_VOXELS = flags.DEFINE_integer(
  "max_voxels", quantify.DEFAULT_MAX_VOXELS, "Largest subvolume quantified, in voxels."
)
_MEMBERS = flags.DEFINE_list(
  "members",
  [],
  "Other segmentations of the stack (each ensemble member's or TTA pass's labels): every "
  "structure quantity gets its range over them and --prediction.",
)
_SIZE_CLASSES = flags.DEFINE_list(
  "size_classes", None, "Classes with a size distribution (default: those named like pores)."
)


def _percent(value: float | None) -> str:
  return "n/a" if value is None else f"{100 * value:.2f} %"


def main(argv):
  if len(argv) > 1:
    sys.exit(f"error: unexpected arguments {argv[1:]}")
  for flag in (_PREDICTION, _TRUTH, _OUT):
    if not flag.value:
      sys.exit(f"error: --{flag.name} is required")
  if not _SLICES.value:
    print(
      "note: scoring every labelled slice, including any the model was trained on; pass "
      "--slices with the held-out slices (config.data.eval_slices) for an honest score",
      file=sys.stderr,
    )
  try:
    slices = evaluation.parse_slices(_SLICES.value)
    if _MAX_VOXELS.value < 8:
      raise evaluation.EvaluationError(f"--max_voxels={_MAX_VOXELS.value}: expected at least 8")
    report = evaluation.evaluate(
      _PREDICTION.value,
      _TRUTH.value,
      slices,
      image=_IMAGE.value,
      structure=_STRUCTURE.value,
      max_voxels=_MAX_VOXELS.value,
      size_classes=_SIZE_CLASSES.value,
      members=_MEMBERS.value,
      labels_unlabelled=None if _UNLABELLED.value is None else int(_UNLABELLED.value),
    )
    paths = evaluation.write_report(report, _OUT.value)
  except (evaluation.EvaluationError, evaluation.MetricsError) as e:
    sys.exit(f"error: {e}")
  except OSError as e:
    sys.exit(f"error: --out={_OUT.value}: {e}")
  o = report.overall
  print(
    f"slices {report.numbers.text(report.slices)}: accuracy {o.accuracy:.4f}, "
    f"mean IoU {o.mean_iou:.4f}, mean Dice {o.mean_dice:.4f}"
  )
  for quantity, q in report.phase_quantities().items():
    print(
      f"{quantity} ({q['class']}): truth {_percent(q['truth'])}, predicted "
      f"{_percent(q['predicted'])}, {report.stack_scope()} "
      f"{_percent(q['predicted_whole_stack'])}"
    )
  if report.structure is not None:
    q = report.structure
    print(f"structure on {q.subvolume.describe(q.voxel_size_nm, report.numbers)}:")
    for p in q.phases:
      along = ", ".join(p.connectivity.percolating_axes)
      sizes = f", d50 {p.sizes.d50_nm:.0f} nm" if p.sizes else ""
      print(
        f"  {p.name}: largest cluster {_percent(p.connectivity.largest_fraction)}, "
        f"percolates {along or 'nowhere'}, S_V {p.surface_density_per_um:.3g} /um{sizes}"
      )
      print("".join(f"    caveat: {c}\n" for c in p.caveats), end="")
  if report.intervals:
    iv = report.intervals
    kind = "calibrated" if "volume_fraction" in iv.get("calibrated", ()) else "range"
    print(f"intervals over {iv['members']} segmentations (min .. max):")
    for phase, entry in iv["phases"].items():
      if "volume_fraction" in entry:
        r = entry["volume_fraction"]
        print(f"  {phase}: volume fraction {_percent(r['min'])} .. {_percent(r['max'])} ({kind})")
    print(f"calibration: {iv.get('calibration', 'not done')}")
  print(f"report:  {paths['markdown']}")
  print(f"         {paths['json']}")
  for p in paths["slices"].values():
    print(f"figure:  {p}")
  if paths["fractions"]:
    print(f"profile: {paths['fractions']}")
  for key in ("structure", "pore_sizes"):
    if paths[key]:
      print(f"figure:  {paths[key]}")


def run(argv: list[str] | None = None) -> None:
  """`fibseg evaluate`: `main` under absl (see `runner.run_module`)."""
  runner.run_module(sys.modules[__name__], argv)
