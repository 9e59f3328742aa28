#!/usr/bin/env bash
# The main job end to end on a generated stack:
#   synthetic FIB-SEM stack (TIFF folders, as an instrument writes them)
#   -> ingest into a volume -> train a 2.5D U-Net on three annotated slices
#   -> segment the whole stack (+ OME-Zarr export for napari / neuroglancer)
#   -> evaluate on a held-out annotated slice, quantify the predicted microstructure
#   -> rank the unannotated slices by the model's uncertainty (which to annotate next).
# Usage: bash experiments/demo.sh [OUT_DIR]; each step is a `fibseg` command (run as
# `python -m fibseg_jax.cli`, the same program). Sizes come from the environment so the
# test suite can run the same script on a tiny stack (see tests/test_demo.py).
set -euo pipefail
OUT=${1:-demo_out}
PY=${PYTHON:-.venv/bin/python}
SHAPE=${DEMO_SHAPE:-24,384,384}
ANNOTATE=${DEMO_ANNOTATE:-5,11,17,20}
EVAL_SLICE=${DEMO_EVAL_SLICE:-20}
STEPS=${DEMO_STEPS:-400}
PATCH=${DEMO_PATCH:-128}
BATCH=${DEMO_BATCH:-8}
TILE=${DEMO_TILE:-256}
OVERLAP=${DEMO_OVERLAP:-64}
MODEL=${DEMO_MODEL:-unet}
# Half the BasicUNet widths (a quarter of the FLOPs) so the demo trains in minutes on a
# laptop CPU; drop this override on an accelerator.
EXTRA=${DEMO_TRAIN_FLAGS:---config.model.features=(16,16,32,64,128,16)}

# Replace only an earlier demo's folder (it carries the marker), never anything else.
if [ -e "$OUT" ] && [ ! -f "$OUT/.fibseg-demo" ]; then
  echo "error: $OUT exists and is not an earlier demo's output; choose another folder" >&2
  exit 1
fi
rm -rf "$OUT"
mkdir -p "$OUT"
touch "$OUT/.fibseg-demo"
echo "== 1/6 synthetic stack -> $OUT/raw"
"$PY" -m fibseg_jax.cli make-synthetic --out="$OUT/raw" --shape="$SHAPE" --seed=0 \
  --annotate="$ANNOTATE" --format=tiff
echo "== 2/6 ingest -> $OUT/vol.zarr"
"$PY" -m fibseg_jax.cli ingest --channel=ICE="$OUT/raw/ICE/*.tif" \
  --channel=TLD="$OUT/raw/TLD/*.tif" --labels="$OUT/raw/labels/*.tif" \
  --classes=pore,csh,portlandite,clinker --voxel_size_nm=50,25,25 --out="$OUT/vol.zarr"
echo "== 3/6 train $MODEL -> $OUT/run"
# shellcheck disable=SC2086
"$PY" -m fibseg_jax.cli train --config="$MODEL" --workdir="$OUT/run" \
  --config.data.path="$OUT/vol.zarr" --config.data.channels=ICE,TLD \
  --config.data.slices=3 --config.data.patch="$PATCH" --config.data.eval_slices="$EVAL_SLICE" \
  --config.train.batch_size="$BATCH" --config.train.steps="$STEPS" \
  --config.train.eval_every=$(( STEPS > 4 ? STEPS / 4 : 1 )) $EXTRA
echo "== 4/6 segment the whole stack -> $OUT/seg.zarr"
"$PY" -m fibseg_jax.cli segment --workdir="$OUT/run" --input="$OUT/vol.zarr" \
  --output="$OUT/seg.zarr" --probabilities="$OUT/probs.zarr" --uncertainty="$OUT/unc.zarr" \
  --tile="$TILE" --overlap="$OVERLAP"
echo "== check the OME-Zarr views against the OME-NGFF 0.5 models (ome-zarr-models)"
"$PY" - "$OUT/vol.zarr/ome" "$OUT/seg.ome.zarr" <<'EOF'
import sys
try:
  from ome_zarr_models import open_ome_zarr
except ImportError:
  print("  skipped: ome-zarr-models is not installed (pip install -r tests/requirements.txt)")
  sys.exit(0)
for path in sys.argv[1:]:
  print(f"  {path}: valid OME-Zarr 0.5 {type(open_ome_zarr(path)).__name__}")
EOF
echo "== 5/6 evaluate slice $EVAL_SLICE -> $OUT/report"
"$PY" -m fibseg_jax.cli evaluate --prediction="$OUT/seg.zarr" --truth="$OUT/vol.zarr" \
  --slices="$EVAL_SLICE" --out="$OUT/report"
echo "== 6/6 which slice to annotate next -> $OUT/suggest"
"$PY" -m fibseg_jax.cli suggest --uncertainty="$OUT/unc.zarr" --volume="$OUT/vol.zarr" \
  --out="$OUT/suggest"
echo
echo "demo finished:"
echo "  synthetic preview     $OUT/raw/preview.png"
echo "  volume                $OUT/vol.zarr"
echo "  training curves       $OUT/run/training_curves.png (metrics: $OUT/run/metrics.jsonl)"
echo "  segmentation          $OUT/seg.zarr (probabilities: $OUT/probs.zarr,"
echo "                        uncertainty: $OUT/unc.zarr)"
echo "  for viewers           $OUT/seg.ome.zarr over $OUT/vol.zarr/ome (OME-Zarr 0.5):"
echo "                        napari --plugin napari-ome-zarr $OUT/seg.ome.zarr"
echo "  report                $OUT/report/report.md ($OUT/report/*.png)"
echo "  next slice to label   $OUT/suggest/suggest.json ($OUT/suggest/uncertainty_z.png)"
