#!/usr/bin/env bash
# Rebuilds a real, labelled FIB-SEM stack (Drosophila medulla, FlyEM) as a fibseg_jax volume.
#
#   bash experiments/stacks/flyem_medulla.sh /path/to/neuroproof_examples [/work/real/flyem_medulla]
#
# Source: https://github.com/janelia-flyem/neuroproof_examples, folder training_sample2/
#   (commit ce839e17, 2016-03-07). Get it with:
#   git clone https://github.com/janelia-flyem/neuroproof_examples
#   (only training_sample2/grayscale_maps, training_sample2/groundtruth.h5.gz and LICENSE.txt are
#   read). This script downloads nothing; it reads only the clone given as $1.
# Citation: FlyEM project, HHMI Janelia, sample data for NeuroProof; cite T. Parag, A. Chakraborty,
#   S. Plaza, L. Scheffer, "A context-aware delayed agglomeration framework for electron microscopy
#   segmentation", PLoS ONE 10(5): e0125825 (2015), and the repository.
# Licence: LICENSE.txt is the Creative Commons Attribution licence (its wording, with "Derivative
#   Work", the label-your-changes clause and the 17 USC royalty waivers, is CC BY 3.0 United
#   States; no NonCommercial or ShareAlike term): use, modification and redistribution (commercial
#   too) with attribution and a note of the changes. So research use yes, and weights derived from
#   it may be redistributed with attribution. Do not commit the data.
# Modality: FIB-SEM (focused ion beam SEM), one signal, 8-bit: a 250 x 250 x 250 cube of the distal
#   Drosophila medulla (neuropil), grayscale_maps/iso.2600.png .. iso.2849.png.
# Voxel size: 10 nm isotropic (training_sample2/README.txt) -> --voxel_size_nm=10,10,10.
# Classes: the truth is a dense NEURON (body) segmentation, groundtruth.h5 'stack' (supervoxels,
#   z,y,x) mapped to bodies by 'transforms'. It is turned into two semantic classes here:
#   1 membrane = every pixel whose 4-neighbour in the same slice belongs to another body
#   (both sides of each interface, so boundaries are 2 px = 20 nm wide, about 12 % of a slice);
#   0 cell = every other pixel. This boundary class is DERIVED from the dense body truth, not
#   painted as such; it follows the dark membranes (checked by eye on overlays).
# Annotated slices (z, 0-based, of 250): 50, 100, 150 for training and 200 held out for evaluation
#   (20/40/60/80 % of the depth, 500 nm apart). The derived truth of all 250 slices is written to
#   $OUT/truth_all/ (same class indices) for evaluation.
# No crop, no resampling; raw intensities are copied as they are (8-bit). The volume is small
#   (250 x 250 px a slice); all 250 slices are kept, 15.6 M voxels in all.
set -euo pipefail

SRC=${1:?usage: flyem_medulla.sh /path/to/neuroproof_examples [out_dir]}
OUT=${2:-/work/real/flyem_medulla}
HERE=$(cd "$(dirname "$0")/../.." && pwd)
PY=${PYTHON:-$HERE/.venv/bin/python}

rm -rf "$OUT/img" "$OUT/lab" "$OUT/truth_all" "$OUT/vol.zarr"
mkdir -p "$OUT/img" "$OUT/lab" "$OUT/truth_all"

nice -n 19 "$PY" - "$SRC" "$OUT" <<'PYEOF'
import gzip, io, sys, pathlib
import h5py
import numpy as np
from PIL import Image

src, out = pathlib.Path(sys.argv[1]) / "training_sample2", pathlib.Path(sys.argv[2])
ANNOTATED = (50, 100, 150, 200)     # train: 50, 100, 150; eval: 200
FIRST = 2600                        # file number of z = 0

raws = sorted((src / "grayscale_maps").glob("iso.*.png"), key=lambda p: int(p.stem.split(".")[1]))
assert len(raws) == 250, len(raws)
with h5py.File(io.BytesIO(gzip.decompress((src / "groundtruth.h5.gz").read_bytes())), "r") as f:
  stack, transforms = f["stack"][:], f["transforms"][:]
lut = np.zeros(int(stack.max()) + 1, np.int64)
lut[transforms[:, 0]] = transforms[:, 1]
bodies = lut[stack]
assert bodies.shape == (250, 250, 250), bodies.shape

for z, r in enumerate(raws):
  assert int(r.stem.split(".")[1]) == FIRST + z, r
  img = np.asarray(Image.open(r))
  assert img.dtype == np.uint8 and img.shape == (250, 250), (img.dtype, img.shape)
  b = bodies[z]
  edge = np.zeros(b.shape, bool)
  dy, dx = b[1:] != b[:-1], b[:, 1:] != b[:, :-1]
  edge[1:] |= dy
  edge[:-1] |= dy
  edge[:, 1:] |= dx
  edge[:, :-1] |= dx
  lab = edge.astype(np.uint8)       # 0 cell, 1 membrane
  Image.fromarray(img).save(out / "img" / f"slice_{z:03d}.png")
  Image.fromarray(lab).save(out / "truth_all" / f"slice_{z:03d}.png")
  if z in ANNOTATED:
    Image.fromarray(lab).save(out / "lab" / f"slice_{z:03d}.png")
print("wrote", len(raws), "image slices,", len(ANNOTATED), "label slices to", out,
      f"({len(np.unique(bodies))} bodies in the truth)")
PYEOF

cd "$HERE"
nice -n 19 "$PY" experiments/ingest.py \
  --channel=SEM="$OUT/img/*.png" \
  --labels="$OUT/lab/*.png" \
  --classes=cell,membrane \
  --voxel_size_nm=10,10,10 \
  --out="$OUT/vol.zarr"
