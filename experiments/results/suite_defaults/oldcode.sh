#!/bin/bash
# Old code (719dc17) trains and segments with the regression study's quick-budget settings;
# today's code scores. Usage: run.sh NAME VOLUME CHANNEL EVAL SEED
set -euo pipefail
name=$1 vol=$2 ch=$3 ev=$4 seed=$5
out=/work/runs/oldcode/${name}_s$seed
[[ -f $out/result.json ]] && { cat $out/result.json; exit 0; }
mkdir -p $out
source /work/main/.venv/bin/activate
cd /work/wt/old
t0=$(date +%s)
PYTHONPATH=/work/wt/old python experiments/train.py --config=experiments/configs/unet.py --workdir=$out/run \
  --config.data.path=$vol --config.data.channels=$ch --config.data.eval_slices=$ev --config.data.patch=128 \
  --config.data.val_block=128 --config.data.workers=2 --config.data.slices=3 --config.model.depth=4 \
  --config.model.features=16,16,32,64,128,16 --config.train.steps=300 --config.train.batch_size=8 \
  --config.train.eval_every=100 --config.train.warmup_steps=30 --config.train.seed=$seed --noprogress > $out/train.log 2>&1
t1=$(date +%s)
PYTHONPATH=/work/wt/old python experiments/segment.py --workdir=$out/run --input=$vol --output=$out/seg.zarr \
  --tile=256 --overlap=32 --batch=4 --notta --slices=$ev --overwrite > $out/segment.log 2>&1 || \
PYTHONPATH=/work/wt/old python experiments/segment.py --workdir=$out/run --input=$vol --output=$out/seg.zarr \
  --tile=256 --overlap=32 --batch=4 --notta --overwrite >> $out/segment.log 2>&1
cd /work/main
python - $vol $ev $out $((t1-t0)) <<'PY'
import json, sys
from fibseg_jax.data import volume as volume_lib
from fibseg_jax.infer import open_array
from fibseg_jax.study import runs
vol, ev, out, secs = sys.argv[1], [int(v) for v in sys.argv[2].split(",")], sys.argv[3], float(sys.argv[4])
truth = volume_lib.Volume.open(vol) if hasattr(volume_lib.Volume, "open") else volume_lib.open_volume(vol)
labels = open_array(out + "/seg.zarr")
pred = {z: labels[z].read().result() for z in ev}
s = runs.score(runs.read_truths(truth, ev), pred, truth.classes)
s["train_seconds"] = secs
json.dump(s, open(out + "/result.json", "w"), indent=1)
print(out, "mean_iou", round(s["mean_iou"], 4))
PY
