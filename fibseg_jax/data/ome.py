"""OME-Zarr (OME-NGFF 0.5) views of volumes and segmentations, for viewers.

NGFF wants the channel axis before z, y, x and a multiscale *group* per image, while the
library keeps channels last ([z, y, x, channel]) and a segmentation is a single array.
So viewers get arrays of their own, written out of core beside the library's (which are
read exactly as before):

  vol.zarr/ome/                     NGFF image: multiscales with axes c, z, y, x in
                                    nanometre, omero channel names and display windows
  vol.zarr/ome/0, 1, ...            [c, z, y, x] pyramid levels
  vol.zarr/ome/labels/annotations/  NGFF image-label of the hand labels
  seg.ome.zarr/                     NGFF image-label of a segmentation (infer.export)

In every viewer label array, value = class index + 1 and 0 = not annotated (or not
segmented): napari, neuroglancer, Avizo and Dragonfly all draw 0 as background, and class
0 (pores) must stay visible. `image-label` names each value's class and its colour, which
follows the class name (`palette`), as in every figure.

Pyramid: level k halves y and x of level k-1 (and z, once z voxels would otherwise be
finer than y-x ones) until the larger y-x side is at most `PYRAMID_SIDE` pixels. Images
are averaged over each 2 x 2 (x 2) block, labels subsampled (nearest), so a label level
only holds values of the level below.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import tensorstore as ts

from fibseg_jax.data import palette

OME_VERSION = "0.5"
UNIT = "nanometer"  # UDUNITS-2 name, as NGFF asks; voxel sizes are stored in nm
VIEW = "ome"  # the NGFF image group inside a volume
ANNOTATIONS = "annotations"  # the hand labels' image-label inside VIEW/labels
NOT_LABELLED = 0  # value of "no class" in viewer label arrays
LABEL_OFFSET = 1  # viewer label value = class index + LABEL_OFFSET
PYRAMID_SIDE = 256
CHUNK_YX = 512
_IN_FLIGHT = 4


def class_colors(classes: Sequence[str] | int) -> np.ndarray:
  """RGB colours [n, 3] in [0, 1] of the classes, by name (`palette.class_colors`): the
  same in every figure and viewer, whatever the class's index or the class count."""
  return palette.class_colors(classes)


@dataclasses.dataclass(frozen=True)
class Pyramid:
  """The levels of a multiscale image.

  Attributes:
    shapes: (z, y, x) of each level, level 0 first.
    factors: (z, y, x) size of a level's voxel in level-0 voxels.
    voxel_size_nm: (z, y, x) voxel size of level 0.
  """

  shapes: tuple[tuple[int, int, int], ...]
  factors: tuple[tuple[int, int, int], ...]
  voxel_size_nm: tuple[float, float, float]

  @property
  def levels(self) -> int:
    return len(self.shapes)

  def scale(self, level: int) -> list[float]:
    """(z, y, x) voxel size of `level` in nm."""
    return [float(v) * f for v, f in zip(self.voxel_size_nm, self.factors[level], strict=True)]

  def step(self, level: int) -> tuple[int, int, int]:
    """(z, y, x) factor between `level` and `level - 1` (each 1 or 2)."""
    prev = self.factors[level - 1]
    return tuple(f // p for f, p in zip(self.factors[level], prev, strict=True))


def pyramid(
  shape: Sequence[int], voxel_size_nm: Sequence[float], side: int = PYRAMID_SIDE
) -> Pyramid:
  """The levels for a [z, y, x] stack: halve y-x until max(y, x) <= `side`.

  z is halved with y and x only once a z voxel is no larger than a y-x voxel of the new
  level, so FIB-SEM stacks (z voxels coarser than y-x) become isotropic first.
  """
  shape = tuple(int(s) for s in shape)
  voxel = tuple(float(v) for v in voxel_size_nm)
  shapes, factors = [shape], [(1, 1, 1)]
  while max(shapes[-1][1:]) > side:
    (z, y, x), (fz, fy, fx) = shapes[-1], factors[-1]
    halve_z = z > 1 and 2 * voxel[0] * fz <= 2 * voxel[1] * fy
    sz = 2 if halve_z else 1
    shapes.append((-(-z // sz), -(-y // 2), -(-x // 2)))
    factors.append((fz * sz, fy * 2, fx * 2))
  return Pyramid(tuple(shapes), tuple(factors), voxel)


def _axes(channel: bool) -> list[dict[str, str]]:
  space = [{"name": n, "type": "space", "unit": UNIT} for n in ("z", "y", "x")]
  return ([{"name": "c", "type": "channel"}] if channel else []) + space


def _multiscale(pyr: Pyramid, *, name: str, channel: bool, averaged: bool) -> dict[str, Any]:
  """One `multiscales` entry. An averaged level's voxel centre sits at the centre of
  the level-0 voxels it covers, so its translation is (factor - 1) / 2 voxels; a
  subsampled (label) level keeps the first voxel's centre."""
  datasets = []
  for level in range(pyr.levels):
    scale = pyr.scale(level)
    transforms = [{"type": "scale", "scale": ([1.0] if channel else []) + scale}]
    if averaged and level:
      shift = [(f - 1) / 2 * v for f, v in zip(pyr.factors[level], pyr.voxel_size_nm, strict=True)]
      transforms.append({"type": "translation", "translation": ([0.0] if channel else []) + shift})
    datasets.append({"path": str(level), "coordinateTransformations": transforms})
  return {
    "name": name,
    "axes": _axes(channel),
    "datasets": datasets,
    "type": "mean" if averaged else "nearest",
  }


def image_attributes(
  pyr: Pyramid,
  *,
  name: str,
  channels: Sequence[str],
  windows: Sequence[tuple[float, float, float, float]],
) -> dict[str, Any]:
  """Group attributes of an NGFF image [c, z, y, x].

  Args:
    pyr: the levels.
    name: shown as the layer name.
    channels: channel names, e.g. ("ICE", "TLD").
    windows: per channel (min, max, start, end): the value range and the display range.
  """
  omero_channels = []
  for i, (label, (lo, hi, start, end)) in enumerate(zip(channels, windows, strict=True)):
    omero_channels.append(
      {
        "label": label,
        "color": "FFFFFF",
        "active": i == 0,  # one grey image by default; the others a click away
        "window": {"min": lo, "max": hi, "start": start, "end": end},
      }
    )
  return {
    "ome": {
      "version": OME_VERSION,
      "multiscales": [_multiscale(pyr, name=name, channel=True, averaged=True)],
      "omero": {"name": name, "channels": omero_channels, "rdefs": {"model": "color"}},
    }
  }


def label_attributes(
  pyr: Pyramid,
  *,
  name: str,
  classes: Sequence[str],
  source: str | None = "../../",
  unlabelled: str = "not annotated",
) -> dict[str, Any]:
  """Group attributes of an NGFF image-label [z, y, x] with class names and colours.

  Args:
    pyr: the levels.
    name: shown as the layer name.
    classes: class names; viewer value i + 1 is classes[i].
    source: relative path from this group to the NGFF image it labels (NGFF's default
      "../../" for a label image inside that image's labels/ group), or None.
    unlabelled: what value 0 means, e.g. "not annotated" or "not segmented".
  """
  colors = [{"label-value": NOT_LABELLED, "rgba": [0, 0, 0, 0]}]
  properties = [{"label-value": NOT_LABELLED, "class": unlabelled}]
  for i, (cls, rgb) in enumerate(zip(classes, class_colors(classes), strict=True)):
    value = i + LABEL_OFFSET
    rgba = [int(round(255 * c)) for c in rgb] + [255]
    colors.append({"label-value": value, "rgba": rgba})
    properties.append({"label-value": value, "class": cls, "class_index": i})
  image_label: dict[str, Any] = {"version": OME_VERSION, "colors": colors}
  image_label["properties"] = properties
  if source is not None:
    image_label["source"] = {"image": source}
  return {
    "ome": {
      "version": OME_VERSION,
      "multiscales": [_multiscale(pyr, name=name, channel=False, averaged=False)],
      "image-label": image_label,
    }
  }


def labels_group_attributes(names: Sequence[str]) -> dict[str, Any]:
  """Attributes of an NGFF image's `labels` group listing its label images."""
  return {"ome": {"version": OME_VERSION, "labels": list(names)}}


def label_values(labels: np.ndarray, ignore: int = 255) -> np.ndarray:
  """Library labels (class index, `ignore` = none) -> viewer values (class + 1, 0 = none).

  Args:
    labels: integer labels of any shape, e.g. [y, x].
    ignore: the library's "no class" value.

  Returns:
    uint8 array of the same shape.
  """
  labels = np.asarray(labels)
  out = labels.astype(np.uint8) + np.uint8(LABEL_OFFSET)
  out[labels == ignore] = NOT_LABELLED
  return out


def group_spec(kvstore: Mapping[str, Any], name: str) -> dict[str, Any]:
  """The kvstore spec of the child `name` (may contain '/') of a group's kvstore."""
  spec = dict(kvstore)
  spec["path"] = spec.get("path", "") + name.strip("/") + "/"
  return spec


def write_group(kvstore: Mapping[str, Any], attributes: Mapping[str, Any], context) -> None:
  """Writes the zarr.json of a zarr v3 group with `attributes`."""
  kv = ts.KvStore.open(dict(kvstore), context=context).result()
  doc = {"zarr_format": 3, "node_type": "group", "attributes": dict(attributes)}
  kv.write("zarr.json", json.dumps(doc, indent=1).encode()).result()


class MultiscaleWriter:
  """The arrays of one NGFF multiscale group: level 0 written slice by slice by the
  caller, the coarser levels and the group metadata by `finish`, all out of core.

  Attributes:
    levels: tensorstores of the levels, [c, z, y, x] for an image, [z, y, x] for labels.
  """

  def __init__(
    self,
    kvstore: Mapping[str, Any],
    pyr: Pyramid,
    *,
    dtype: str,
    channels: int | None,
    fill: Any,
    context: ts.Context,
  ):
    """Creates (replacing) every level's array.

    Args:
      kvstore: kvstore spec of the group (path ends with '/').
      pyr: the levels.
      dtype: zarr data type name, e.g. "uint16".
      channels: number of channels of an image, None for a label image.
      fill: fill value.
      context: tensorstore context (one whose cache does not grow with the volume).
    """
    self.kvstore = dict(kvstore)
    self.pyramid = pyr
    self.channels = channels
    self.context = context
    names = (["c"] if channels else []) + ["z", "y", "x"]
    self.levels = []
    for level, (z, y, x) in enumerate(pyr.shapes):
      shape = ([channels] if channels else []) + [z, y, x]
      chunks = ([1] if channels else []) + [1, min(CHUNK_YX, y), min(CHUNK_YX, x)]
      spec = {
        "driver": "zarr3",
        "kvstore": group_spec(self.kvstore, str(level)),
        "metadata": {
          "shape": shape,
          "data_type": dtype,
          "fill_value": fill,
          "chunk_grid": {"name": "regular", "configuration": {"chunk_shape": chunks}},
          "codecs": [{"name": "bytes"}, {"name": "zstd", "configuration": {"level": 3}}],
          "dimension_names": names,
        },
        "create": True,
        "delete_existing": True,
      }
      self.levels.append(ts.open(spec, context=context).result())

  def write_slice(self, z: int, data: np.ndarray) -> ts.Future:
    """Writes slice z of level 0: data [c, y, x] for an image, [y, x] for labels."""
    level0 = self.levels[0]
    return (level0[:, z] if self.channels else level0[z]).write(data)

  def finish(self, attributes: Mapping[str, Any], *, averaged: bool) -> None:
    """Fills the coarser levels from level 0, then writes the group's zarr.json.

    Args:
      attributes: the group attributes (`image_attributes` / `label_attributes`).
      averaged: average blocks (images) instead of taking their first voxel (labels).
    """
    for level in range(1, self.pyramid.levels):
      _downsample(
        self.levels[level - 1],
        self.levels[level],
        self.pyramid.step(level),
        channel=bool(self.channels),
        reduce=_block_mean if averaged else _block_first,
      )
    write_group(self.kvstore, attributes, self.context)


def rewrite_label_slice(
  kvstore: Mapping[str, Any], pyr: Pyramid, z: int, values: np.ndarray, context
) -> None:
  """Replaces slice z of an existing label pyramid (written by `MultiscaleWriter` with
  `averaged=False`) at every level that samples it: a label level keeps the first voxel
  of each block, so level l holds level 0's slices z % fz == 0, subsampled by (fy, fx).

  Args:
    kvstore: kvstore spec of the label image's group.
    pyr: its levels.
    z: the level-0 slice.
    values: viewer values [y, x] (`label_values`).
    context: tensorstore context.
  """
  futures = []
  for level, (fz, fy, fx) in enumerate(pyr.factors):
    if z % fz:
      continue
    spec = {"driver": "zarr3", "kvstore": group_spec(kvstore, str(level))}
    array = ts.open(spec, open=True, context=context).result()
    futures.append(array[z // fz].write(values[::fy, ::fx]))
  for f in futures:
    f.result()


def _block_mean(data: np.ndarray, step: Sequence[int]) -> np.ndarray:
  """Mean over step-sized blocks of the last three axes [..., z, y, x]; a block cut by
  the edge averages the voxels it has (edge padding repeats them)."""
  tail = [(0, (-n) % s) for n, s in zip(data.shape[-3:], step, strict=True)]
  pad = [(0, 0)] * (data.ndim - 3) + tail
  padded = np.pad(data.astype(np.float32), pad, mode="edge")
  lead, (z, y, x) = padded.shape[:-3], padded.shape[-3:]
  sz, sy, sx = step
  blocks = padded.reshape(*lead, z // sz, sz, y // sy, sy, x // sx, sx)
  mean = blocks.mean(axis=(-5, -3, -1))
  if np.issubdtype(data.dtype, np.integer):
    info = np.iinfo(data.dtype)
    return np.clip(np.rint(mean), info.min, info.max).astype(data.dtype)
  return mean.astype(data.dtype)


def _block_first(data: np.ndarray, step: Sequence[int]) -> np.ndarray:
  """The first voxel of each step-sized block of the last three axes (nearest)."""
  sz, sy, sx = step
  return data[..., ::sz, ::sy, ::sx]


def _downsample(
  src: ts.TensorStore,
  dst: ts.TensorStore,
  step: Sequence[int],
  *,
  channel: bool,
  reduce: Callable[[np.ndarray, Sequence[int]], np.ndarray],
) -> None:
  """dst = reduce(src), one output slice at a time (reads `step[0]` source slices)."""
  z_axis = 1 if channel else 0
  depth = int(src.shape[z_axis])
  pending: list[ts.Future] = []
  for zo in range(int(dst.shape[z_axis])):
    z0, z1 = zo * step[0], min(depth, (zo + 1) * step[0])
    data = (src[:, z0:z1] if channel else src[z0:z1]).read().result()
    out = reduce(data, step)
    while len(pending) >= _IN_FLIGHT:
      pending.pop(0).result()
    pending.append((dst[:, zo : zo + 1] if channel else dst[zo : zo + 1]).write(out))
  for f in pending:
    f.result()
