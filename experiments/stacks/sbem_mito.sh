#!/usr/bin/env bash
# Rebuilds a real, labelled serial block-face SEM stack (mitochondria) as a fibseg_jax volume.
#
#   bash experiments/stacks/sbem_mito.sh /path/to/cdeep3m [/work/real/sbem_mito]
#
# Source: https://github.com/CRBS/cdeep3m, folder mito_testsample/ (commit abf99580, 2020-02-09;
#   the sample itself was added 2018-02/05). Get it with: git clone https://github.com/CRBS/cdeep3m
#   This script downloads nothing; it reads only the clone given as $1.
# Citation: M. G. Haberl, C. Churas, L. Tindall et al., "CDeep3M - Plug-and-Play cloud-based deep
#   learning for image segmentation", Nature Methods 15, 677-680 (2018), doi:10.1038/s41592-018-0106-z.
# Licence: the repository's LICENSE (Regents of the University of California, 2018): copying,
#   modifying and distributing for educational, research and non-profit purposes without fee is
#   granted with the copyright notice kept; commercial use needs UCSD's Technology Transfer Office.
#   So: research use yes; weights derived from it may be shared only for research / non-profit
#   use, with the notice. Do not commit the data to this repo.
# Modality: serial block-face SEM (SBEM), NOT FIB-SEM (the repo names it "sbem"), one signal
#   (backscattered electrons), 8-bit, 1024 x 1024 px per slice. The repo does not name the
#   tissue; by eye it is brain neuropil (axons, dendrites, myelin).
# Voxel size: 5.9 nm in-plane, 40 nm slices (CDeep3M's model for it is named
#   sbem/mitochrondria/xy5.9nm40nmz) -> --voxel_size_nm=40,5.9,5.9 (about 7:1 anisotropic).
# Classes (mitos_3D.NNN.png, indexed PNG): 0 -> 0 background, 1 -> 1 mitochondria
#   (about 8-10 % of each slice is mitochondria).
# Stack: mito_testsample/training = 20 consecutive slices (files 010..029), every one densely
#   labelled; they become z = 0..19. Annotated slices given to training: 3, 8, 13 (train) and
#   18 (held out for evaluation), about 15/40/65/90 % of the depth. The dense truth of all 20
#   slices is written to $OUT/truth_all/ (same class indices) for evaluation.
#   (The repo's validation/ block, files 050..059, is a separate labelled block 20 slices
#   further on and is not used here; testset/ has no labels.)
# No crop, no resampling; raw intensities are copied as they are (8-bit).
set -euo pipefail

SRC=${1:?usage: sbem_mito.sh /path/to/cdeep3m [out_dir]}
OUT=${2:-/work/real/sbem_mito}
HERE=$(cd "$(dirname "$0")/../.." && pwd)
PY=${PYTHON:-$HERE/.venv/bin/python}

rm -rf "$OUT/img" "$OUT/lab" "$OUT/truth_all" "$OUT/vol.zarr"
mkdir -p "$OUT/img" "$OUT/lab" "$OUT/truth_all"

nice -n 19 "$PY" - "$SRC" "$OUT" <<'PYEOF'
import sys, pathlib
import numpy as np
from PIL import Image

src, out = pathlib.Path(sys.argv[1]) / "mito_testsample" / "training", pathlib.Path(sys.argv[2])
ANNOTATED = (3, 8, 13, 18)          # train: 3, 8, 13; eval: 18
FIRST = 10                          # file number of z = 0

raws = sorted((src / "images").glob("images.*.png"))
labs = sorted((src / "labels").glob("mitos_3D.*.png"))
assert len(raws) == len(labs) == 20, (len(raws), len(labs))
for z, (r, l) in enumerate(zip(raws, labs)):
  assert int(r.stem.split(".")[1]) == int(l.stem.split(".")[1]) == FIRST + z, (r, l)
  img = np.asarray(Image.open(r).convert("L"))
  lab = np.asarray(Image.open(l))     # indexed PNG: the indices are the classes
  assert img.dtype == np.uint8 and img.shape == lab.shape == (1024, 1024), (img.dtype, img.shape, lab.shape)
  if not set(np.unique(lab)) <= {0, 1}:
    raise SystemExit(f"{l}: unexpected label values {sorted(set(np.unique(lab)) - {0, 1})}")
  lab = lab.astype(np.uint8)
  Image.fromarray(img).save(out / "img" / f"slice_{z:03d}.png")
  Image.fromarray(lab).save(out / "truth_all" / f"slice_{z:03d}.png")
  if z in ANNOTATED:
    Image.fromarray(lab).save(out / "lab" / f"slice_{z:03d}.png")
print("wrote", len(raws), "image slices,", len(ANNOTATED), "label slices to", out)
PYEOF

cd "$HERE"
nice -n 19 "$PY" experiments/ingest.py \
  --channel=BSE="$OUT/img/*.png" \
  --labels="$OUT/lab/*.png" \
  --labels_unlabelled=255 \
  --classes=background,mitochondria \
  --voxel_size_nm=40,5.9,5.9 \
  --out="$OUT/vol.zarr"
