"""Exports of a finished segmentation for viewers and other tools, written out of core.

  export.export_segmentation("seg.zarr", "zarr")   # -> seg.ome.zarr
  export.export_segmentation("seg.zarr", "tiff")   # -> seg.tif

- "zarr": an OME-Zarr (OME-NGFF 0.5) image-label group: [z, y, x] uint8 levels (a
  pyramid for viewing the whole stack), axes in nanometre from the voxel size, class
  names and colours in `image-label`, and `source` pointing at the input volume's NGFF
  image (``vol.zarr/ome``) when both are local, so napari (napari-ome-zarr) opens the
  image under the segmentation and neuroglancer places them at the same scale.
- "tiff": one multi-page TIFF [z, y, x] uint8 for Fiji, Dragonfly and Avizo: ImageJ
  hyperstack with the voxel size in micrometres, the class names in its Info and a
  colour table in the class colours; above 4 GiB a BigTIFF with one page per slice.

In both, value = class index + 1 and 0 = not segmented (every one of these tools draws
0 as background); the library's own `seg.zarr` keeps class index and 255.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator, Sequence
from typing import Any

import jax
import numpy as np
import tensorstore as ts
import tifffile

from fibseg_jax import outputs
from fibseg_jax.data import ome
from fibseg_jax.data import volume as volume_lib
from fibseg_jax.infer import store, tiling
from fibseg_jax.infer.store import OutputError

FORMATS = ("zarr", "tiff", "none")
# ImageJ hyperstacks above this size are written as BigTIFF instead (ImageJ-format files
# over 4 GiB hold a single page, which Dragonfly and Avizo do not read as a stack).
IMAGEJ_MAX_BYTES = 2**32 - 2**25
EXPORT_ATTRIBUTE = "fibseg_export"


def default_path(output: Any, fmt: str) -> str:
  """Where an export of `output` goes by default: seg.zarr -> seg.ome.zarr / seg.tif."""
  base = volume_lib.describe(output).rstrip("/")
  if base.endswith(".zarr"):
    base = base[: -len(".zarr")]
  return base + (".ome.zarr" if fmt == "zarr" else ".tif")


def check_path(
  path: Any,
  fmt: str,
  *,
  overwrite: bool,
  labels: Any | None = None,
  flag: str = "--export",
  source: Any | None = None,
) -> None:
  """Checks, before any work, that an export can be written at `path`.

  An earlier export of the same `labels` is derived data and may always be replaced; an
  export of other labels only with `overwrite`; anything else never (see
  `fibseg_jax.outputs`): the input volume, a folder holding it, or other files.

  Raises:
    OutputError: something not ours is there, an earlier export without `overwrite`, the
      parent directory is missing, or a TIFF is asked for on a non-local store.
  """
  if fmt not in FORMATS:
    raise OutputError(f"--format={fmt}: expected one of {', '.join(FORMATS)}")
  if fmt == "none":
    return
  where = volume_lib.describe(path)
  local = volume_lib.local_path(path)
  if fmt == "tiff" and local is None:
    raise OutputError(f"{flag}={where}: a TIFF export needs a local file path")
  inputs = {"--output": labels} if labels is not None else {}
  source = source if source is not None else (store.read_source(labels) if labels else None)
  if source is not None:
    inputs["--input"] = source
  if local is not None:
    same = labels is not None and _exported_from(path, fmt) == labels
    try:
      outputs.claim(
        local,
        kind=f"{fmt} export",
        flag=flag,
        inputs=inputs,
        is_own=lambda p: _exported_from(p, fmt) is not None,
        overwrite=overwrite or same,
      )
    except outputs.OutputError as e:
      raise OutputError(str(e)) from e
    return
  kv = ts.KvStore.open(volume_lib.kvstore_spec(path), context=volume_lib.CONTEXT).result()
  if kv.list().result():
    exported = _exported_from(path, fmt)
    if exported is None:
      raise OutputError(
        f"{flag}={where} holds data that is not a fibseg export; fibseg replaces only its "
        "own outputs: choose another path"
      )
    if not overwrite and exported != labels:
      raise OutputError(f"{flag}={where} already exists; pass --overwrite to replace it")


def _exported_from(path: Any, fmt: str) -> str | None:
  """The `source_id` of the labels an existing export at `path` was written from, if any."""
  try:
    if fmt == "zarr":
      meta = store.read_array_metadata(path) or {}
      return meta.get("attributes", {}).get(EXPORT_ATTRIBUTE, {}).get("labels")
    with tifffile.TiffFile(os.fspath(path)) as tif:
      info = (tif.imagej_metadata or {}).get("Info") or tif.pages[0].description
  except (OutputError, OSError, ValueError, tifffile.TiffFileError):
    return None
  head, sep, _ = str(info).partition(";")
  prefix = "fibseg_jax segmentation of "
  return head[len(prefix) :] if sep and head.startswith(prefix) else None


def _segmentation(labels: Any) -> store.Segmentation:
  """The `fibseg segment` labels output at `labels`, with its classes and voxel size."""
  where = volume_lib.describe(labels)
  seg = store.open_segmentation(labels)
  if seg.array.rank != 3 or seg.array.dtype.name != "uint8":
    raise OutputError(f"{where}: expected labels [z, y, x] uint8, got {seg.array.dtype.name}")
  if not seg.classes:
    raise OutputError(
      f"{where}: its attributes name no classes; was it written by `fibseg segment`?"
    )
  if seg.voxel_size_nm is None:
    raise OutputError(f"{where}: its run record has no voxel_size_nm; segment it again")
  return seg


def _slices(array: ts.TensorStore) -> Iterator[np.ndarray]:
  """Slices of a [z, y, x] array in the viewers' values, reading one slice ahead."""
  depth = int(array.shape[0])
  future = array[0].read()
  for z in range(depth):
    data = future.result()
    if z + 1 < depth:
      future = array[z + 1].read()
    yield ome.label_values(data, store.NOT_SEGMENTED)


def _source_image(source: Any, final: str | None) -> str | None:
  """The relative path from the export to the source volume's NGFF image, if both are
  local and the volume has one."""
  local = volume_lib.local_path(source) if source else None
  if local is None or final is None:
    return None
  image = os.path.join(local, ome.VIEW)
  if not os.path.isfile(os.path.join(image, "zarr.json")):
    return None
  return os.path.relpath(image, final)


def write_ome_zarr(labels: Any, path: Any, *, overwrite: bool = False) -> str:
  """Writes the OME-Zarr image-label export of a segmentation (see the module doc).

  Args:
    labels: the `fibseg segment` output array [z, y, x] uint8.
    path: the export group, e.g. seg.ome.zarr (local path or any kvstore root).
    overwrite: replace what is at `path`.

  Returns:
    `path` as a string.

  Raises:
    OutputError: `path` exists without `overwrite`, or `labels` is not a segmentation.
  """
  check_path(path, "zarr", overwrite=overwrite, labels=store.source_id(labels))
  seg = _segmentation(labels)
  array, classes, voxel, source = seg.array, seg.classes, seg.voxel_size_nm, seg.source
  final = volume_lib.local_path(path)
  if final is not None:
    outputs.remove_stale_partials(final)
  target = outputs.partial_sibling(final) if final is not None else path
  kvstore = volume_lib.kvstore_spec(target)
  if final is None:
    kv = ts.KvStore.open(kvstore, context=volume_lib.CONTEXT).result()
    kv.delete_range(ts.KvStore.KeyRange()).result()
  pyr = ome.pyramid(array.shape, voxel)
  try:
    writer = ome.MultiscaleWriter(
      kvstore,
      pyr,
      dtype="uint8",
      channels=None,
      fill=ome.NOT_LABELLED,
      context=store.STREAM_CONTEXT,
    )
    pending: list[ts.Future] = []
    for z, values in enumerate(_slices(array)):
      if len(pending) >= 2:
        pending.pop(0).result()
      pending.append(writer.write_slice(z, values))
    for f in pending:
      f.result()
    attrs = ome.label_attributes(
      pyr,
      name=os.path.basename(volume_lib.describe(path).rstrip("/")),
      classes=classes,
      source=_source_image(source, final),
      unlabelled="not segmented",
    )
    attrs[EXPORT_ATTRIBUTE] = {"labels": store.source_id(labels), "source": source}
    writer.finish(attrs, averaged=False)
  except BaseException as e:
    if final is not None:
      shutil.rmtree(target, ignore_errors=True)
    if isinstance(e, Exception) and outputs.is_disk_full(e):
      raise _disk_full(path, array) from e
    raise
  if final is not None:
    outputs.replace(target, final)
  return volume_lib.describe(path)


def _imagej_lut(classes: Sequence[str]) -> np.ndarray:
  """ImageJ colour table [3, 256] uint8: value i + 1 in class i's colour, 0 black."""
  lut = np.zeros((3, 256), np.uint8)
  colors = np.rint(255 * ome.class_colors(classes)).astype(np.uint8)
  lut[:, ome.LABEL_OFFSET : ome.LABEL_OFFSET + len(classes)] = colors.T
  return lut


def write_tiff(labels: Any, path: str | os.PathLike, *, overwrite: bool = False) -> str:
  """Writes the TIFF stack export of a segmentation (see the module doc).

  Args:
    labels: the `fibseg segment` output array [z, y, x] uint8.
    path: the TIFF file to write, e.g. seg.tif.
    overwrite: replace an existing file.

  Returns:
    `path` as a string.

  Raises:
    OutputError: `path` exists without `overwrite`, is not local, or `labels` is not a
      segmentation.
  """
  path = os.fspath(path)
  check_path(path, "tiff", overwrite=overwrite, labels=store.source_id(labels))
  seg = _segmentation(labels)
  array, classes, voxel = seg.array, seg.classes, seg.voxel_size_nm
  shape = tuple(int(s) for s in array.shape)
  vz, vy, vx = (v / 1000.0 for v in voxel)  # micrometres
  names = ", ".join(f"{i + ome.LABEL_OFFSET}={c}" for i, c in enumerate(classes))
  info = (
    f"fibseg_jax segmentation of {store.source_id(labels)}; values: 0=not segmented, "
    f"{names}; voxel size (z, y, x) nm: {voxel[0]:g}, {voxel[1]:g}, {voxel[2]:g}"
  )
  outputs.remove_stale_partials(path)
  tmp = outputs.partial_sibling(path)
  try:
    if int(np.prod(shape)) <= IMAGEJ_MAX_BYTES:
      tifffile.imwrite(
        tmp,
        _slices(array),
        shape=shape,
        dtype=np.uint8,
        imagej=True,
        photometric="minisblack",
        resolution=(1.0 / vx, 1.0 / vy),
        metadata={
          "axes": "ZYX",
          "spacing": vz,
          "unit": "um",
          "Info": info,
          "LUTs": [_imagej_lut(classes)],
        },
      )
    else:
      tifffile.imwrite(
        tmp,
        _slices(array),
        shape=shape,
        dtype=np.uint8,
        bigtiff=True,
        photometric="minisblack",
        resolution=(1e4 / vx, 1e4 / vy),  # pixels per centimetre, the unit every reader knows
        resolutionunit="CENTIMETER",
        description=info,
        metadata=None,
      )
  except BaseException as e:
    if os.path.exists(tmp):
      os.remove(tmp)
    if isinstance(e, Exception) and outputs.is_disk_full(e):
      raise _disk_full(path, array) from e
    raise
  os.replace(tmp, path)
  return path


def _disk_full(path: Any, array: ts.TensorStore) -> OutputError:
  """A full disk while exporting: the export needs at most a byte a voxel (+ pyramid)."""
  needed = 1.15 * int(np.prod(array.shape))
  return OutputError(outputs.disk_full_message("--export", path, needed, "export"))


def export_segmentation(
  labels: Any, fmt: str, path: Any | None = None, *, overwrite: bool = False
) -> str | None:
  """Writes the `fmt` export ("zarr", "tiff" or "none") of a finished segmentation.

  Args:
    labels: the `fibseg segment` output array [z, y, x] uint8.
    fmt: "zarr" (OME-Zarr image-label), "tiff" (TIFF stack) or "none".
    path: where; default `default_path(labels, fmt)`.
    overwrite: replace an existing export.

  Returns:
    The path written, or None for "none".
  """
  if fmt == "none":
    return None
  path = default_path(labels, fmt) if path is None else path
  if fmt == "zarr":
    return write_ome_zarr(labels, path, overwrite=overwrite)
  if fmt == "tiff":
    return write_tiff(labels, path, overwrite=overwrite)
  raise OutputError(f"--format={fmt}: expected one of {', '.join(FORMATS)}")


def export_when_complete(
  labels: Any, fmt: str, path: Any | None = None, *, overwrite: bool = False
) -> str | None:
  """`export_segmentation` once every block of the segmentation is finished.

  Every process of a run calls this after `segment_volume`; in a multi-process run it
  waits for all of them, then process 0 alone writes the export.

  Returns:
    The path written, or None (format "none", not process 0, or blocks unfinished).
  """
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # noqa: PLC0415 - multi-host runs only

    multihost_utils.sync_global_devices("fibseg_jax.infer.export")
    if jax.process_index() != 0:
      return None
  if fmt == "none" or not is_complete(labels):
    return None
  return export_segmentation(labels, fmt, path, overwrite=overwrite)


def is_complete(labels: Any) -> bool:
  """Whether every block of a `fibseg segment` output is marked finished."""
  attrs = store.read_attributes(labels)
  run = attrs.get(store.ATTRIBUTE, {}).get("run", {})
  array = store.open_array(labels)
  blocks = tiling.plan_blocks(tuple(int(s) for s in array.shape), int(run.get("block", 2048)))
  kv = ts.KvStore.open(volume_lib.kvstore_spec(labels), context=volume_lib.CONTEXT).result()
  return {b.key for b in blocks} <= store.list_done(kv)
