#!/usr/bin/env bash
# The paper's comparison on a stack: U-Net and Sensor-3D fed ICE, TLD or both, with 1, 3
# or 5 slices; nine models trained on the same annotated slices, each evaluated on the
# same held-out slice. Prints a table of mean IoU per model.
# Usage: bash experiments/paper_sweep.sh VOLUME EVAL_SLICE OUT_DIR
# (e.g. the demo's: bash experiments/paper_sweep.sh demo_out/vol.zarr 20 sweep_out).
# STEPS, PATCH, BATCH and WIDTH come from the environment.
set -euo pipefail
VOL=$1
EVAL=$2
OUT=$3
PY=${PYTHON:-.venv/bin/python}
STEPS=${STEPS:-400}
PATCH=${PATCH:-128}
BATCH=${BATCH:-8}
UNET_FEATURES=${UNET_FEATURES:-(16,16,32,64,128,16)}
mkdir -p "$OUT"
# name model channels slices
RUNS="
unet_ice_1 unet ICE 1
unet_tld_1 unet TLD 1
unet_both_1 unet ICE,TLD 1
unet_both_3 unet ICE,TLD 3
unet_both_5 unet ICE,TLD 5
s3d_ice_3 sensor3d ICE 3
s3d_tld_3 sensor3d TLD 3
s3d_both_3 sensor3d ICE,TLD 3
s3d_both_5 sensor3d ICE,TLD 5
"
echo "$RUNS" | while read -r name model channels slices; do
  [ -z "$name" ] && continue
  if [ -f "$OUT/$name/report/report.json" ]; then continue; fi
  extra=()
  if [ "$model" = unet ]; then extra+=("--config.model.features=$UNET_FEATURES"); fi
  echo "== $name"
  "$PY" experiments/train.py --config="experiments/configs/$model.py" --workdir="$OUT/$name/run" \
    --config.data.path="$VOL" --config.data.channels="$channels" --config.data.slices="$slices" \
    --config.data.patch="$PATCH" --config.data.eval_slices="$EVAL" \
    --config.train.batch_size="$BATCH" --config.train.steps="$STEPS" \
    --config.train.eval_every=$(( STEPS > 4 ? STEPS / 4 : 1 )) --progress=false "${extra[@]}"
  "$PY" experiments/segment.py --workdir="$OUT/$name/run" --input="$VOL" \
    --output="$OUT/$name/seg.zarr" --tile=256 --overwrite
  "$PY" experiments/evaluate.py --prediction="$OUT/$name/seg.zarr" --truth="$VOL" \
    --slices="$EVAL" --out="$OUT/$name/report"
done
"$PY" - "$OUT" <<'PYEOF'
import json, os, sys
out = sys.argv[1]
print("| model | accuracy | mean IoU | per-class IoU |")
print("|---|---|---|---|")
for name in sorted(os.listdir(out)):
  path = os.path.join(out, name, "report", "report.json")
  if not os.path.exists(path):
    continue
  overall = json.load(open(path))["overall"]
  fmt = lambda v: "n/a" if v is None else f"{v:.4f}"  # noqa: E731
  iou = ", ".join(f"{c} {fmt(v['iou'])}" for c, v in overall["per_class"].items())
  print(f"| {name} | {fmt(overall['accuracy'])} | {fmt(overall['mean_iou'])} | {iou} |")
PYEOF
