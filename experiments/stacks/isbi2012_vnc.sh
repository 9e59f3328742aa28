#!/usr/bin/env bash
# Rebuilds the ISBI 2012 EM segmentation challenge training stack (ssTEM) as a fibseg_jax volume.
#
#   bash experiments/stacks/isbi2012_vnc.sh /path/to/unet [/work/real/isbi2012_vnc]
#
# Source: the ISBI 2012 challenge training set (http://brainiac2.mit.edu/isbi_challenge/), as
#   split into one PNG per section in https://github.com/zhixuhao/unet, folder
#   data/membrane/train/{image,label}/0..29.png (commit b45af4d4, 2019-02-21; the multi-page
#   train-volume.tif beside them is not read). Get it with: git clone https://github.com/zhixuhao/unet
#   This script downloads nothing; it reads only the clone given as $1.
# Citation (the challenge's terms): A. Cardona et al., "An integrated micro- and macroarchitectural
#   analysis of the Drosophila brain by computer-assisted serial section electron microscopy",
#   PLoS Biol 8(10): e1000502 (2010); and I. Arganda-Carreras et al., "Crowdsourcing the creation
#   of image segmentation algorithms for connectomics", Front. Neuroanat. 9:142 (2015).
# Licence: the challenge lets the data be used "for the purpose of generating or testing
#   non-commercial image segmentation software", citing the above; the unet repo's MIT licence
#   covers its code, not the data. So research / non-commercial use only; weights derived from it
#   should not be redistributed for commercial use. Do not commit the data to this repo.
# Modality: serial-section TEM (ssTEM), NOT FIB-SEM: Drosophila first-instar larva ventral nerve
#   cord, 30 consecutive sections of 512 x 512 px, 8-bit. (Same lab and tissue type as the
#   drosophila_vnc stack, a different animal and stack: partly redundant with it.)
# Voxel size: 4 x 4 nm in-plane, 50 nm sections -> --voxel_size_nm=50,4,4.
# Classes (label PNGs hold 0 and 255 only): 255 cell -> 0 cell, 0 membrane -> 1 membrane
#   (about 22 % membrane).
# Annotated slices (z, 0-based, of 30): 6, 12, 18 for training and 24 held out for evaluation
#   (20/40/60/80 % of the depth). Every section is densely labelled; all 30 are written to
#   $OUT/truth_all/ (same class indices) for evaluation.
# No crop, no resampling; raw intensities are copied as they are (8-bit).
set -euo pipefail

SRC=${1:?usage: isbi2012_vnc.sh /path/to/unet [out_dir]}
OUT=${2:-/work/real/isbi2012_vnc}
HERE=$(cd "$(dirname "$0")/../.." && pwd)
PY=${PYTHON:-$HERE/.venv/bin/python}

rm -rf "$OUT/img" "$OUT/lab" "$OUT/truth_all" "$OUT/vol.zarr"
mkdir -p "$OUT/img" "$OUT/lab" "$OUT/truth_all"

nice -n 19 "$PY" - "$SRC" "$OUT" <<'PYEOF'
import sys, pathlib
import numpy as np
from PIL import Image

src, out = pathlib.Path(sys.argv[1]) / "data" / "membrane" / "train", pathlib.Path(sys.argv[2])
ANNOTATED = (6, 12, 18, 24)         # train: 6, 12, 18; eval: 24

for z in range(30):
  img = np.asarray(Image.open(src / "image" / f"{z}.png"))
  grey = np.asarray(Image.open(src / "label" / f"{z}.png").convert("L"))
  assert img.dtype == np.uint8 and img.shape == grey.shape == (512, 512), (z, img.dtype, img.shape)
  if not set(np.unique(grey)) <= {0, 255}:
    raise SystemExit(f"label {z}.png: unexpected grey values {sorted(set(np.unique(grey)) - {0, 255})}")
  lab = (grey == 0).astype(np.uint8)  # 0 cell, 1 membrane
  Image.fromarray(img).save(out / "img" / f"slice_{z:03d}.png")
  Image.fromarray(lab).save(out / "truth_all" / f"slice_{z:03d}.png")
  if z in ANNOTATED:
    Image.fromarray(lab).save(out / "lab" / f"slice_{z:03d}.png")
print("wrote 30 image slices,", len(ANNOTATED), "label slices to", out)
PYEOF

cd "$HERE"
nice -n 19 "$PY" experiments/ingest.py \
  --channel=EM="$OUT/img/*.png" \
  --labels="$OUT/lab/*.png" \
  --classes=cell,membrane \
  --voxel_size_nm=50,4,4 \
  --out="$OUT/vol.zarr"
