r"""Paper-size rehearsal: segment whole 3868 x 4062 two-signal slices with default flags.

  python experiments/rehearsal.py --volume=/work/rehearsal/vol12.zarr --slices_count=12 \
    --out=/work/rehearsal/rehearsal.json [--features=16,16,32,64,128,16]

Generates the synthetic stack once (reused), segments it in a fresh process with the
default flags (peak and sampled RSS recorded), times the bare forward pass on the same
tiles and extrapolates to the paper's 156 slices. Logic: `fibseg_jax.bench.rehearsal`.
"""

import json
import os
import sys

from absl import app, flags

from fibseg_jax.bench import rehearsal

_VOLUME = flags.DEFINE_string("volume", None, "Volume to segment (generated if absent).")
_COUNT = flags.DEFINE_integer("slices_count", 10, "Slices of the generated stack.")
_FEATURES = flags.DEFINE_list(
  "features", ["16", "16", "32", "64", "128", "16"], "U-Net widths (the quick budget's)."
)
_OUT = flags.DEFINE_string("out", None, "JSON file of the figures.")


def main(argv):
  if len(argv) > 1:
    sys.exit(f"error: unexpected arguments {argv[1:]}")
  if not _VOLUME.value or not _OUT.value:
    sys.exit("error: --volume and --out are required")
  shape = (_COUNT.value, *rehearsal.PAPER_SHAPE[1:])
  try:
    generated = rehearsal.generate(_VOLUME.value, shape)
    features = [int(f) for f in _FEATURES.value]
  except ValueError as e:
    sys.exit(f"error: {e}")
  output = os.path.join(os.path.dirname(os.path.abspath(_OUT.value)), "rehearsal_seg.zarr")
  result = rehearsal.rehearse(_VOLUME.value, output, features=features)
  result["generation"] = generated
  rehearsal.write(result, _OUT.value)
  print(json.dumps({k: v for k, v in result.items() if k != "forward_calls"}, indent=1))


if __name__ == "__main__":
  app.run(main)
