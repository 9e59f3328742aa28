r"""A whole-slice segmentation from brush strokes in seconds, with no network training.

  fibseg preview --volume=vol.zarr --channels=ICE,TLD --slices=20,21 --out=preview/

A random forest is fitted on the volume's painted pixels (every annotated slice; labels
255 = not painted, e.g. strokes from napari), and the shipped prior (`fibseg pretrain`,
fibseg_jax/prior/) corrects its class probabilities on each slice asked for. Writes, per
slice N (the numbers of your files): preview/slice_N.tif (uint8 class indices) and
preview/slice_N.png (image | forest | forest + prior), and preview/preview.json with the
times. --exclude=N,... keeps annotated slices out of the forest (to score on them).
"""

import json
import os
import sys
import time

import numpy as np
import tifffile
from absl import flags

from fibseg_jax import outputs
from fibseg_jax.cli import runner
from fibseg_jax.data import lists
from fibseg_jax.data import volume as volume_lib

_VOLUME = flags.DEFINE_string("volume", None, "Volume with painted slices (fibseg ingest).")
_CHANNELS = flags.DEFINE_string("channels", None, "Channels to use; default: all of the volume.")
_SLICES = flags.DEFINE_string("slices", None, "Slice numbers (your files') to segment.")
_EXCLUDE = flags.DEFINE_string("exclude", "", "Annotated slice numbers the forest must not see.")
_OUT = flags.DEFINE_string("out", None, "New folder (or an earlier preview's) for the results.")
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the forest.")
_PRIOR = flags.DEFINE_string(
  "prior", None, "Folder of another prior (fibseg pretrain --export); default: the shipped one."
)
KIND = "strokes preview"


def _figure(path: str, image: np.ndarray, forest: np.ndarray, prior: np.ndarray, classes, title):
  from matplotlib.backends.backend_agg import FigureCanvasAgg  # noqa: PLC0415
  from matplotlib.figure import Figure  # noqa: PLC0415
  from matplotlib.patches import Patch  # noqa: PLC0415

  from fibseg_jax.data import palette  # noqa: PLC0415

  ny, nx = forest.shape
  fig = Figure(figsize=(13, 4.4 * ny / nx + 0.8), dpi=80, layout="constrained")
  FigureCanvasAgg(fig)
  axes = fig.subplots(1, 3)
  lo, hi = np.percentile(image[..., 0], (0.5, 99.5))
  axes[0].imshow(image[..., 0], cmap="gray", vmin=lo, vmax=max(hi, lo + 1))
  axes[0].set_title("image")
  cmap = palette.class_colormap(classes)
  for ax, labels, name in ((axes[1], forest, "random forest"), (axes[2], prior, "forest + prior")):
    ax.imshow(labels, cmap=cmap, vmin=-0.5, vmax=len(classes) - 0.5, interpolation="nearest")
    ax.set_title(name)
  colors = palette.class_colors(classes)
  axes[2].legend(
    handles=[Patch(color=colors[i], label=c) for i, c in enumerate(classes)],
    loc="upper left",
    bbox_to_anchor=(1.02, 1.0),
    fontsize=8,
    frameon=False,
  )
  for ax in axes:
    ax.set_xticks([])
    ax.set_yticks([])
  fig.suptitle(title)
  fig.savefig(path, format="png")


def main(argv):
  runner.begin(argv, required={"volume": "vol.zarr", "slices": "20", "out": "preview/"})
  from fibseg_jax.infer import enhance  # noqa: PLC0415 - loads JAX

  try:
    vol = volume_lib.open_volume(_VOLUME.value)
    numbering = vol.metadata.numbering
    channels = (
      lists.parse_list(_CHANNELS.value, str, flag="--channels") if _CHANNELS.value else vol.channels
    )
    vol.channel_indices(channels, flag="--channels")
    slices = numbering.to_zs(lists.parse_list(_SLICES.value, int, flag="--slices"), "--slices")
    exclude = numbering.to_zs(lists.parse_list(_EXCLUDE.value, int, flag="--exclude"), "--exclude")
    out = os.path.abspath(_OUT.value)
    outputs.claim(out, kind=KIND, flag="--out", inputs={"--volume": _VOLUME.value}, directory=True)
    prior = enhance.load_prior(_PRIOR.value or enhance.PRIOR_DIR)
  except (ValueError, outputs.OutputError) as e:
    sys.exit(f"error: {e}")
  start = time.perf_counter()
  try:
    result = enhance.preview(vol, channels, slices, prior=prior, exclude=exclude, seed=_SEED.value)
  except ValueError as e:
    sys.exit(f"error: {e}")
  total = time.perf_counter() - start
  os.makedirs(out, exist_ok=True)
  index = vol.channel_indices(channels)
  for z in slices:
    n = numbering.label(z)
    tifffile.imwrite(os.path.join(out, f"slice_{n:04d}.tif"), result.labels[z])
    _figure(
      os.path.join(out, f"slice_{n:04d}.png"),
      vol.read_image(z)[..., index].astype(np.float32),
      result.forest_labels[z],
      result.labels[z],
      vol.classes,
      f"slice {n}: forest fitted on the painted pixels of slices "
      f"{numbering.text(result.training_slices)}, corrected by the prior",
    )
  record = {
    "volume": os.path.abspath(str(_VOLUME.value)),
    "slices": numbering.labels(slices),
    "training_slices": numbering.labels(result.training_slices),
    "excluded": numbering.labels(exclude),
    "seconds": {**result.seconds, "total": round(total, 2)},
    "prior": prior.provenance.get("sha256"),
  }
  with open(os.path.join(out, "preview.json"), "w") as f:
    json.dump(record, f, indent=1)
  s = result.seconds
  print(
    f"preview: slices {numbering.text(slices)} -> {out} in {total:.0f} s (forest fit "
    f"{s['fit']:.0f} s on slices {numbering.text(result.training_slices)}, forest "
    f"{s['forest']:.0f} s, prior {s['enhance']:.0f} s)"
  )


def run(argv: list[str] | None = None) -> None:
  """`fibseg preview`: `main` under absl (see `runner.run_module`)."""
  runner.run_module(sys.modules[__name__], argv)
