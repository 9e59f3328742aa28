#!/usr/bin/env bash
# Rebuilds every real stack of the suite from clones that already sit under one folder.
#
#   bash experiments/stacks/rebuild_all.sh [/work/src] [/work/real]
#
# Expects, under SRC (default /work/src), clones named as in experiments/stacks/README.md:
#   groundtruth-drosophila-vnc, cdeep3m, neuroproof_examples, unet.
# Downloads nothing; a missing clone stops the script with its name and the clone command.
set -euo pipefail

SRC=${1:-/work/src}
OUT=${2:-/work/real}
HERE=$(cd "$(dirname "$0")/../.." && pwd)

need() {
  [[ -d "$SRC/$1" ]] || { echo "rebuild_all.sh: no clone $SRC/$1; get it with: git clone $2 $SRC/$1" >&2; exit 1; }
}
need groundtruth-drosophila-vnc https://github.com/unidesigner/groundtruth-drosophila-vnc
need cdeep3m https://github.com/CRBS/cdeep3m
need neuroproof_examples https://github.com/janelia-flyem/neuroproof_examples
need unet https://github.com/zhixuhao/unet

bash "$HERE/experiments/real_stack.sh" "$SRC/groundtruth-drosophila-vnc" "$OUT/drosophila_vnc"
bash "$HERE/experiments/stacks/sbem_mito.sh" "$SRC/cdeep3m" "$OUT/sbem_mito"
bash "$HERE/experiments/stacks/flyem_medulla.sh" "$SRC/neuroproof_examples" "$OUT/flyem_medulla"
bash "$HERE/experiments/stacks/isbi2012_vnc.sh" "$SRC/unet" "$OUT/isbi2012_vnc"
