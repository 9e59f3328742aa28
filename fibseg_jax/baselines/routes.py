"""The three classical routes, fitted and applied like the networks.

  otsu        (a) multi-Otsu thresholds of the raw signals, classes matched by mean
              intensity (`threshold.MultiOtsu`).
  clean_otsu  (b) destripe, flat-field and denoise every channel (`cleaning`), then (a).
  forest      (c) a random forest on multiscale features of the raw signals
              (`forest.RandomForest`).

A route takes raw slices [y, x, C] and returns labels [y, x] uint8. It learns from the
same pixels as a network: `training_slices` reads the annotated slices of a volume with
the validation blocks of the training loader's split (same `val_fraction`, `val_block`,
`split_seed`) and the evaluation slices left out. Nothing is assumed about the data but
the volume's channels and classes; intensities are normalised by the 0.5 and 99.5
percentiles of the (cleaned) training slices, as the networks' loader does from the
volume's statistics.

  route = baselines.make_route("forest", num_classes=4, seed=0)
  images, labels = baselines.training_slices("vol.zarr", ("ICE", "TLD"), eval_slices=(20,))
  route.fit(images, labels)
  prediction = route.predict(vol.read_image(20))   # [y, x] uint8
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import tensorstore as ts

from fibseg_jax.baselines import cleaning as cleaning_lib
from fibseg_jax.baselines import forest as forest_lib
from fibseg_jax.baselines import threshold
from fibseg_jax.data import loader as loader_lib
from fibseg_jax.data import split
from fibseg_jax.data import volume as volume_lib
from fibseg_jax.progress import Bar

ROUTES = ("otsu", "clean_otsu", "forest")
IGNORE_LABEL = volume_lib.IGNORE_LABEL


@dataclasses.dataclass
class Route:
  """Optional cleaning, percentile normalisation and a pixel classifier.

  Attributes:
    name: one of `ROUTES` (or any name for a custom route).
    segmenter: `threshold.MultiOtsu` or `forest.RandomForest` (fit / predict on
      normalised slices).
    cleaning: applied to every slice first; None for the raw signals.
    offset, scale: per-channel normalisation x_norm = (x - offset) * scale, from `fit`.
    seconds: wall time of the last `fit` ("clean", "fit") and of all `predict` calls
      ("clean_predict", "predict").
  """

  name: str
  segmenter: Any
  cleaning: cleaning_lib.CleaningConfig | None = None
  offset: np.ndarray | None = None
  scale: np.ndarray | None = None
  seconds: dict[str, float] = dataclasses.field(default_factory=dict)

  @property
  def num_parameters(self) -> int:
    """Fitted numbers of the classifier (see its `num_parameters`) plus the normalisation."""
    extra = 0 if self.offset is None else 2 * self.offset.size
    return int(self.segmenter.num_parameters) + extra

  def _clean(self, image: np.ndarray, key: str) -> np.ndarray:
    image = np.asarray(image)
    if image.ndim == 2:
      image = image[..., None]
    if self.cleaning is None:
      return image.astype(np.float32)
    start = time.perf_counter()
    out = cleaning_lib.clean_slice(image, self.cleaning)
    self.seconds[key] = self.seconds.get(key, 0.0) + time.perf_counter() - start
    return out

  def _normalise(self, image: np.ndarray) -> np.ndarray:
    return ((image - self.offset) * self.scale).astype(np.float32)

  def fit(self, images: Sequence[np.ndarray], labels: Sequence[np.ndarray]) -> Route:
    """Cleans (if set), fits the normalisation and the classifier.

    Args:
      images: raw training slices [y, x, C] (or [y, x]).
      labels: their labels [y, x] uint8; 255 = not a training pixel.

    Returns:
      self.

    Raises:
      ValueError: no images, images and labels differ in number or shape, or no
        labelled pixel.
    """
    if not images or len(images) != len(labels):
      raise ValueError(f"route {self.name}: give as many training slices as label slices (>= 1)")
    self.seconds = {"clean": 0.0}
    cleaned = [self._clean(image, "clean") for image in images]
    for image, label in zip(cleaned, labels, strict=True):
      if image.shape[:2] != label.shape:
        raise ValueError(
          f"route {self.name}: slice {list(image.shape)} and labels {list(label.shape)} differ"
        )
    pixels = np.concatenate(
      [c.reshape(-1, c.shape[-1])[:: max(1, c[..., 0].size // 65536)] for c in cleaned]
    )
    lo, hi = np.percentile(pixels, (0.5, 99.5), axis=0)
    spread = np.where(hi - lo > 1e-6 * np.maximum(1.0, np.abs(hi)), hi - lo, 2.0)
    self.offset = ((lo + hi) / 2).astype(np.float32)
    self.scale = (2.0 / spread).astype(np.float32)
    start = time.perf_counter()
    self.segmenter.fit([self._normalise(c) for c in cleaned], list(labels))
    self.seconds["fit"] = time.perf_counter() - start
    self.seconds.setdefault("clean_predict", 0.0)
    self.seconds.setdefault("predict", 0.0)
    return self

  def normalised(self, image: np.ndarray) -> np.ndarray:
    """A raw slice [y, x, C] (or [y, x]) cleaned and normalised as the classifier sees it."""
    if self.offset is None:
      raise ValueError(f"route {self.name}: normalised called before fit")
    return self._normalise(self._clean(image, "clean_predict"))

  def _apply(self, image: np.ndarray, method: str) -> np.ndarray:
    """The segmenter's `method` on a raw slice, cleaned and normalised as in `fit`."""
    if self.offset is None:
      raise ValueError(f"route {self.name}: {method} called before fit")
    cleaned = self._clean(image, "clean_predict")
    start = time.perf_counter()
    out = getattr(self.segmenter, method)(self._normalise(cleaned))
    self.seconds["predict"] = self.seconds.get("predict", 0.0) + time.perf_counter() - start
    return out

  def predict(self, image: np.ndarray) -> np.ndarray:
    """Labels of a raw slice [y, x, C]: uint8 [y, x]."""
    return self._apply(image, "predict")

  def probabilities(self, image: np.ndarray) -> np.ndarray:
    """Class probabilities of a raw slice [y, x, C]: float32 [y, x, classes].

    Raises:
      ValueError: before `fit`, or for a route without probabilities (the Otsu routes).
    """
    if not hasattr(self.segmenter, "probabilities"):
      raise ValueError(f"route {self.name} gives labels only, no class probabilities")
    return self._apply(image, "probabilities")


def write_probabilities(
  route: Route,
  volume: volume_lib.Volume,
  channels: Sequence[str],
  path: str,
  *,
  progress: bool = False,
) -> str:
  """Writes a fitted route's class probabilities of every slice as a teacher array.

  The array is [z, y, x, classes] uint8 round(255 p), the format of `fibseg segment
  --probabilities`, so `--config.distill.teacher=PATH` teaches a network the route's
  predictions (e.g. a forest trained on brush strokes). It is written next to `path`
  and moved there when complete; an existing zarr array at `path` is replaced.

  Returns:
    `path`.

  Raises:
    ValueError: something other than a zarr array is at `path` (never deleted).
  """
  if os.path.exists(path) and not _is_zarr_array(path):
    raise ValueError(f"{path} exists and is not a zarr array; refusing to replace it")
  depth, height, width = volume.shape
  k = len(volume.classes)
  index = volume.channel_indices(channels)
  partial = f"{path}.partial"
  shutil.rmtree(partial, ignore_errors=True)
  array = ts.open(
    {
      "driver": "zarr3",
      "kvstore": volume_lib.kvstore_spec(partial),
      "metadata": {
        "shape": [depth, height, width, k],
        "data_type": "uint8",
        "fill_value": 0,
        "chunk_grid": {
          "name": "regular",
          "configuration": {"chunk_shape": [1, min(height, 512), min(width, 512), k]},
        },
        "codecs": [{"name": "bytes"}, {"name": "zstd", "configuration": {"level": 1}}],
        "attributes": {"fibseg": {"kind": "probabilities", "route": route.name}},
        "dimension_names": ["z", "y", "x", "class"],
      },
      "create": True,
    },
    context=volume_lib.CONTEXT,
  ).result()
  for z in Bar(
    range(depth), desc=f"{route.name} probabilities", unit="slice", disable=not progress
  ):
    p = route.probabilities(volume.read_image(z)[..., index])
    array[z].write(np.rint(255 * np.clip(p, 0, 1)).astype(np.uint8)).result()
  shutil.rmtree(path, ignore_errors=True)
  os.replace(partial, path)
  return path


def _is_zarr_array(path: str) -> bool:
  try:
    with open(os.path.join(path, "zarr.json")) as f:
      return json.load(f).get("node_type") == "array"
  except (OSError, ValueError, AttributeError):
    return False


def make_route(
  name: str,
  num_classes: int,
  *,
  seed: int = 0,
  cleaning: cleaning_lib.CleaningConfig | None = None,
  forest: forest_lib.ForestConfig | None = None,
) -> Route:
  """One of the classical routes, unfitted.

  Args:
    name: "otsu", "clean_otsu" or "forest".
    num_classes: classes of the volume (k of multi-Otsu).
    seed: seed of the forest (the Otsu routes are deterministic).
    cleaning: settings of clean_otsu's cleaning; default `CleaningConfig()`.
    forest: settings of the forest; default `ForestConfig()`.

  Raises:
    ValueError: unknown name.
  """
  if name == "otsu":
    return Route(name, threshold.MultiOtsu(num_classes))
  if name == "clean_otsu":
    return Route(name, threshold.MultiOtsu(num_classes), cleaning or cleaning_lib.CleaningConfig())
  if name == "forest":
    config = forest or forest_lib.ForestConfig()
    return Route(name, forest_lib.RandomForest(num_classes, config, seed=seed))
  raise ValueError(f"baseline route {name!r} is not one of {ROUTES}")


def training_slices(
  volume: volume_lib.Volume | Any,
  channels: Sequence[str],
  *,
  eval_slices: Sequence[int] = (),
  val_fraction: float = 0.25,
  val_block: int = 128,
  split_seed: int = 0,
) -> tuple[dict[int, np.ndarray], dict[int, np.ndarray]]:
  """The raw training slices of a volume and their training labels.

  The pixels are those a network trains on with the same split settings: labelled
  pixels of the annotated slices outside `eval_slices`, minus the validation blocks.

  Args:
    volume: an opened volume or its root.
    channels: channel names to read, in order.
    eval_slices: annotated slices kept out.
    val_fraction, val_block, split_seed: the training loader's split
      (`--config.data.val_fraction`, `val_block`, `split_seed`).

  Returns:
    ({z: image [y, x, C]}, {z: labels [y, x] uint8 with 255 off the training pixels}).

  Raises:
    LoaderError / VolumeError: the split or channels do not fit the volume.
  """
  vol = volume if isinstance(volume, volume_lib.Volume) else volume_lib.open_volume(volume)
  index = vol.channel_indices(channels)
  train, masks = loader_lib.split_regions(
    vol,
    eval_slices=eval_slices,
    val_fraction=val_fraction,
    val_block=val_block,
    split_seed=split_seed,
  )
  images, labels = {}, {}
  for z in train:
    label = vol.read_labels(z)
    labels[z] = np.where(masks[z] == split.REGION_TRAIN, label, IGNORE_LABEL).astype(np.uint8)
    images[z] = vol.read_image(z)[..., index]
  return images, labels
