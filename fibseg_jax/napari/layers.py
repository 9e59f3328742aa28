"""napari layers of fibseg volumes and segmentations, and the npe2 reader.

Layers come as napari's LayerData tuples (data, keyword arguments, layer type):

* a volume: one image layer per channel (read lazily, slice by slice, from the zarr
  store; contrast from the stored 0.5-99.5 percentiles) and its hand labels as a Labels
  layer `annotations` (0 = not painted, class i as i + 1, the classes' own colours);
* a `fibseg segment` output: its labels as a Labels layer, an uncertainty array as an
  image.

Every layer's scale is the voxel size in nm (z, y, x), so pixels are square and the
z axis keeps its true spacing. `napari vol.zarr` opens a volume with this reader once
the package is installed (the `napari` extra).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from fibseg_jax.data import annotations, palette
from fibseg_jax.data import volume as volume_lib
from fibseg_jax.infer import store

ANNOTATIONS = "annotations"
CHANNEL_COLORMAPS = ("gray", "green", "magenta", "cyan", "yellow")


class LazyChannel:
  """One channel of a volume's image, read from the store only where napari looks."""

  def __init__(self, image: Any, channel: int):
    self._image, self._channel = image, channel
    self.shape = tuple(int(s) for s in image.shape[:3])
    self.dtype = np.dtype(image.dtype.numpy_dtype)
    self.ndim = 3

  def __getitem__(self, index: Any) -> np.ndarray:
    index = index if isinstance(index, tuple) else (index,)
    return np.asarray(
      self._image[(*index, *[slice(None)] * (3 - len(index)), self._channel)].read().result()
    )

  def __array__(self, dtype=None, copy=None):
    data = self[:]
    return data if dtype is None else data.astype(dtype)


class LazyLabels:
  """A `fibseg segment` label array as napari values (class + 1, 0 = not segmented),
  read from the store only where napari looks."""

  def __init__(self, array: Any):
    self._array = array
    self.shape = tuple(int(s) for s in array.shape)
    self.dtype = np.dtype(np.uint8)
    self.ndim = len(self.shape)

  def __getitem__(self, index: Any) -> np.ndarray:
    data = np.asarray(self._array[index].read().result())
    values = data + np.uint8(1)
    values[data == volume_lib.IGNORE_LABEL] = 0
    return values

  def __array__(self, dtype=None, copy=None):
    data = self[...]
    return data if dtype is None else data.astype(dtype)


def label_colormap(classes: Sequence[str]) -> Any:
  """napari colormap: value i + 1 in the colour of classes[i], 0 transparent."""
  from napari.utils.colormaps import DirectLabelColormap  # noqa: PLC0415 - napari extra

  colors = {None: (0, 0, 0, 0), 0: (0, 0, 0, 0)}
  for i, rgb in enumerate(palette.class_colors(list(classes))):
    colors[i + 1] = (*(float(c) for c in rgb), 1.0)
  return DirectLabelColormap(color_dict=colors)


def label_kwargs(name: str, classes: Sequence[str], scale: Sequence[float]) -> dict[str, Any]:
  """Labels-layer keywords: the classes' colours and names (shown under the cursor)."""
  return {
    "name": name,
    "scale": tuple(scale),
    "colormap": label_colormap(classes),
    "features": {"index": list(range(len(classes) + 1)), "class": ["none", *classes]},
    "metadata": {"classes": list(classes)},
  }


def volume_layers(root: str | os.PathLike) -> list[tuple[Any, dict[str, Any], str]]:
  """The channels of a volume as image layers and its hand labels as `annotations`."""
  vol = volume_lib.open_volume(root, check_labels=False)
  meta = vol.metadata
  scale = tuple(meta.voxel_size_nm)
  layers = []
  for c, name in enumerate(meta.channels):
    stats = meta.channel_stats.get(name) or {}
    kwargs = {
      "name": name,
      "scale": scale,
      "colormap": "gray" if len(meta.channels) == 1 else CHANNEL_COLORMAPS[1 + c % 4],
      "blending": "additive" if c else "translucent",
      "metadata": {"fibseg_volume": os.fspath(root), "channel": name},
    }
    if "p0.5" in stats and float(stats["p99.5"]) > float(stats["p0.5"]):
      kwargs["contrast_limits"] = (float(stats["p0.5"]), float(stats["p99.5"]))
    layers.append((LazyChannel(vol.image, c), kwargs, "image"))
  if meta.classes:
    kwargs = label_kwargs(ANNOTATIONS, meta.classes, scale)
    kwargs["metadata"]["fibseg_volume"] = os.fspath(root)
    layers.append((annotations.painted_from_volume(vol), kwargs, "labels"))
  return layers


def segmentation_layers(
  path: str | os.PathLike, name: str | None = None, voxel_size_nm: Sequence[float] | None = None
) -> list[tuple[Any, dict[str, Any], str]]:
  """A `fibseg segment` array: labels as a Labels layer (class + 1), uncertainty as an image."""
  seg = store.open_segmentation(path)
  scale = tuple(voxel_size_nm or seg.voxel_size_nm or (1.0, 1.0, 1.0))
  name = name or os.path.basename(os.fspath(path).rstrip("/")).removesuffix(".zarr")
  if seg.kind == "uncertainty":
    kwargs = {"name": name, "scale": scale, "colormap": "inferno", "contrast_limits": (0, 255)}
    return [(LazyChannel(seg.array[..., np.newaxis], 0), kwargs, "image")]
  if seg.kind == "probabilities":
    raise ValueError(f"{path}: a probabilities array; open the labels (--output) instead")
  if not seg.classes:
    raise ValueError(f"{path}: its attributes name no classes; not a `fibseg segment` output")
  return [(LazyLabels(seg.array), label_kwargs(name, seg.classes, scale), "labels")]


def get_reader(path: str | list[str]):
  """npe2 reader: a function reading `path` if it is a fibseg volume or segmentation."""
  if isinstance(path, list):
    if len(path) != 1:
      return None
    path = path[0]
  path = os.fspath(path).rstrip("/")
  if volume_lib.is_volume(path):
    return lambda p: volume_layers(path)
  try:
    seg = store.open_segmentation(path)
  except Exception:  # noqa: BLE001 - not ours: let another reader try
    return None
  if seg.kind in ("labels", "uncertainty") and seg.array.rank == 3:
    return lambda p: segmentation_layers(path)
  return None
