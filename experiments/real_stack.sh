#!/usr/bin/env bash
# Rebuilds a real, labelled volume-EM stack as a fibseg_jax volume.
#
#   bash experiments/real_stack.sh /path/to/groundtruth-drosophila-vnc [/work/real/drosophila_vnc]
#
# Source: https://github.com/unidesigner/groundtruth-drosophila-vnc (commit 4a5f0514, 2013),
#   "Segmented anisotropic ssTEM dataset of neural tissue", S. Gerhard, J. Funke, J. Martel,
#   A. Cardona, R. Fetter. figshare, doi:10.6084/m9.figshare.856713.
#   Get it with: git clone https://github.com/unidesigner/groundtruth-drosophila-vnc
#   This script downloads nothing; it reads only the clone given as $1.
# Licence: CC BY-NC-SA 3.0 (the repo's README): non-commercial use, attribution, share-alike;
#   cite the figshare record above in any publication. Do not commit the data to this repo.
# Modality: serial-section TEM (ssTEM), NOT FIB-SEM: Drosophila L3 ventral nerve cord,
#   stack1 = 20 consecutive sections of 1024 x 1024 px, 8-bit, with dense expert labels.
# Voxel size: 4.6 x 4.6 nm in-plane, sections 45-50 nm thick -> --voxel_size_nm=50,4.6,4.6
#   (strongly anisotropic, about 11:1).
# Classes (from stack1/labels, grey value -> index):
#   255 intracellular -> 0 intracellular
#   0/32/64/96 oriented membrane, 128 membrane junction -> 1 membrane
#   191 -> 2 mitochondria, 223 -> 3 synapse, 159 glia/extracellular -> 4 glia_extracellular
# Annotated slices (z, 0-based, of 20): 4, 8, 12 for training and 16 held out for evaluation
#   (about 20/40/60/80 % of the depth). Only these four get a label file; the dense truth of
#   all 20 slices is written to $OUT/truth_all/ (same class indices) for evaluation.
# No crop, no resampling; raw intensities are copied as they are (8-bit).
set -euo pipefail

SRC=${1:?usage: real_stack.sh /path/to/groundtruth-drosophila-vnc [out_dir]}
OUT=${2:-/work/real/drosophila_vnc}
HERE=$(cd "$(dirname "$0")/.." && pwd)
PY=${PYTHON:-$HERE/.venv/bin/python}

rm -rf "$OUT/img" "$OUT/lab" "$OUT/truth_all" "$OUT/vol.zarr"
mkdir -p "$OUT/img" "$OUT/lab" "$OUT/truth_all"

nice -n 19 "$PY" - "$SRC" "$OUT" <<'EOF'
import sys, pathlib
import numpy as np
from PIL import Image

src, out = pathlib.Path(sys.argv[1]) / "stack1", pathlib.Path(sys.argv[2])
ANNOTATED = (4, 8, 12, 16)          # train: 4, 8, 12; eval: 16
GREY_TO_CLASS = {255: 0, 0: 1, 32: 1, 64: 1, 96: 1, 128: 1, 191: 2, 223: 3, 159: 4}

raws = sorted((src / "raw").glob("*.tif"))
labs = sorted((src / "labels").glob("labels*.png"))
assert len(raws) == len(labs) == 20, (len(raws), len(labs))
for z, (r, l) in enumerate(zip(raws, labs)):
    assert int(r.stem) == z and int(l.stem[len("labels"):]) == z, (r, l)
    img = np.asarray(Image.open(r))
    grey = np.asarray(Image.open(l).convert("L"))
    assert img.dtype == np.uint8 and img.shape == grey.shape == (1024, 1024), (img.dtype, img.shape)
    lab = np.full(grey.shape, 255, np.uint8)
    for g, c in GREY_TO_CLASS.items():
        lab[grey == g] = c
    if (lab == 255).any():
        raise SystemExit(f"slice {z}: unexpected label grey values {sorted(set(np.unique(grey)) - set(GREY_TO_CLASS))}")
    Image.fromarray(img).save(out / "img" / f"slice_{z:03d}.png")
    Image.fromarray(lab).save(out / "truth_all" / f"slice_{z:03d}.png")
    if z in ANNOTATED:
        Image.fromarray(lab).save(out / "lab" / f"slice_{z:03d}.png")
print("wrote", len(raws), "image slices,", len(ANNOTATED), "label slices to", out)
EOF

cd "$HERE"
nice -n 19 "$PY" experiments/ingest.py \
  --channel=EM="$OUT/img/*.png" \
  --labels="$OUT/lab/*.png" \
  --classes=intracellular,membrane,mitochondria,synapse,glia_extracellular \
  --voxel_size_nm=50,4.6,4.6 \
  --out="$OUT/vol.zarr"
