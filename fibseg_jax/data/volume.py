"""Multi-channel FIB-SEM volume store: one zarr v3 group written with tensorstore.

Layout of a dataset (readable by zarr-python as well):

  <root>/zarr.json   group; its attributes hold the metadata (`VolumeMetadata`)
  <root>/image       [z, y, x, channel] as acquired: uint8, uint16 or float32
  <root>/labels      [z, y, x] uint8; `IGNORE_LABEL` (255) means "not annotated"
  <root>/ome/        OME-NGFF 0.5 copy for viewers ([c, z, y, x] image pyramid and the
                     labels as an image-label; see `fibseg_jax.data.ome`)

The labels array has fill value 255, so only the annotated slices take space. A root is
any tensorstore kvstore: a local path (default), ``memory://name``, ``gs://bucket/p``,
``s3://bucket/p`` or a kvstore spec dict.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import tensorstore as ts

from fibseg_jax import outputs
from fibseg_jax.data import ome

IGNORE_LABEL = 255
FORMAT_VERSION = 1
IMAGE_DTYPES = ("uint8", "uint16", "float32")
# Percentiles stored per channel; the loader normalises with the outer pair.
PERCENTILES = (0.5, 1.0, 50.0, 99.0, 99.5)
# Chunk: one slice by 256 x 256 with all channels. A slab of S slices around any
# annotated slice reads exactly S slices; see BUILD_NOTES.md for the benchmark.
DEFAULT_CHUNK_YX = 256
_STATS_SAMPLES_PER_SLICE = 1 << 16
# Samples kept per channel over the whole stack (64 MiB of float32 a channel).
_STATS_MAX_SAMPLES = 1 << 24

# One context for the process, so `memory://` stores persist between opens and every
# open shares the chunk cache and thread pools.
CONTEXT = ts.Context({"cache_pool": {"total_bytes_limit": 256 << 20}})
# The OME view is written and downsampled once, slice by slice: no cache to fill.
_OME_CONTEXT = ts.Context(ts.Context.Spec({"cache_pool": {"total_bytes_limit": 0}}), parent=CONTEXT)


class VolumeError(ValueError):
  """A volume is missing, malformed, or does not match what was asked of it."""


@dataclasses.dataclass(frozen=True)
class VolumeMetadata:
  """What the group attributes of a volume say.

  Attributes:
    shape: (z, y, x) in voxels.
    channels: detector signal names, one per last-axis entry of `image`, e.g. ("ICE", "TLD").
    classes: phase names; label value i is classes[i].
    voxel_size_nm: (z, y, x) voxel size in nanometres.
    annotated_slices: z indices that carry hand labels.
    channel_stats: per channel name, {"p0.5", "p1", "p50", "p99", "p99.5", "mean", "std"}.
    dtype: image dtype name.
    slice_numbers: the user's number of each z (the number in its file name, as ingest
      read it), or () when they are z itself (synthetic stacks, volumes written before
      ingest stored them). See `SliceNumbers`.
  """

  shape: tuple[int, int, int]
  channels: tuple[str, ...]
  classes: tuple[str, ...]
  voxel_size_nm: tuple[float, float, float]
  annotated_slices: tuple[int, ...] = ()
  channel_stats: Mapping[str, Mapping[str, float]] = dataclasses.field(default_factory=dict)
  dtype: str = "uint16"
  slice_numbers: tuple[int, ...] = ()

  @property
  def num_classes(self) -> int:
    return len(self.classes)

  @property
  def numbering(self) -> SliceNumbers:
    """z <-> the user's slice numbers (`SliceNumbers`)."""
    return SliceNumbers.of(self.slice_numbers, self.shape[0])

  def to_json(self) -> dict[str, Any]:
    return {
      "fibseg_format": FORMAT_VERSION,
      "shape": list(self.shape),
      "channels": list(self.channels),
      "classes": list(self.classes),
      "voxel_size_nm": list(self.voxel_size_nm),
      "annotated_slices": list(self.annotated_slices),
      "channel_stats": {k: dict(v) for k, v in self.channel_stats.items()},
      "dtype": self.dtype,
      **({"slice_numbers": list(self.slice_numbers)} if self.slice_numbers else {}),
    }

  @classmethod
  def from_json(cls, attrs: Mapping[str, Any], where: str = "volume") -> VolumeMetadata:
    missing = [
      k
      for k in ("shape", "channels", "classes", "voxel_size_nm", "annotated_slices")
      if k not in attrs
    ]
    if "fibseg_format" not in attrs or missing:
      raise VolumeError(
        f"{where}: group attributes are not a fibseg_jax volume "
        f"(missing {missing or ['fibseg_format']}); create one with `fibseg ingest` "
        "or `fibseg make-synthetic`"
      )
    return cls(
      shape=tuple(int(s) for s in attrs["shape"]),
      channels=tuple(str(c) for c in attrs["channels"]),
      classes=tuple(str(c) for c in attrs["classes"]),
      voxel_size_nm=tuple(float(v) for v in attrs["voxel_size_nm"]),
      annotated_slices=tuple(int(z) for z in attrs["annotated_slices"]),
      channel_stats={k: dict(v) for k, v in attrs.get("channel_stats", {}).items()},
      dtype=str(attrs.get("dtype", "uint16")),
      slice_numbers=_slice_numbers(attrs.get("slice_numbers"), int(attrs["shape"][0])),
    )


def _slice_numbers(value: Any, depth: int) -> tuple[int, ...]:
  """The stored slice numbers when they fit the stack (one a z, increasing), else ()."""
  try:
    numbers = tuple(int(n) for n in value or ())
  except (TypeError, ValueError):
    return ()
  if len(numbers) != depth or any(b <= a for a, b in zip(numbers, numbers[1:], strict=False)):
    return ()
  return () if numbers == tuple(range(depth)) else numbers


@dataclasses.dataclass(frozen=True)
class SliceNumbers:
  """One slice numbering for the user: the numbers of their own files.

  Ingest stores the number in each image file's name (``slice_0001.tif`` -> 1) for
  every z; every flag, message, report and file name of the product speaks in those
  numbers, and only code inside the package counts z from 0. A stack whose files are
  numbered from 0 (synthetic ones), or a volume written before ingest stored the numbers,
  has number = z.

  Attributes:
    numbers: the number of each z, increasing; () for number = z.
    depth: slices in the stack.
  """

  numbers: tuple[int, ...]
  depth: int

  @classmethod
  def of(cls, numbers: Sequence[int] | None, depth: int) -> SliceNumbers:
    return cls(_slice_numbers(numbers, int(depth)), int(depth))

  @property
  def is_identity(self) -> bool:
    return not self.numbers

  def label(self, z: int) -> int:
    """The user's number of slice z (z itself for a z outside the stack)."""
    z = int(z)
    return self.numbers[z] if self.numbers and 0 <= z < self.depth else z

  def labels(self, zs: Sequence[int]) -> list[int]:
    return [self.label(z) for z in zs]

  def text(self, zs: Sequence[int]) -> str:
    """'3, 6, 9' for z = 2, 5, 8 of a stack numbered from 1."""
    return ", ".join(str(n) for n in self.labels(zs))

  def describe(self) -> str:
    """The valid numbers, e.g. '1..12' (or '1..4, 6..12' where numbers are missing)."""
    numbers = self.numbers or tuple(range(self.depth))
    if not numbers:
      return "none"
    runs, start = [], numbers[0]
    for a, b in zip(numbers, (*numbers[1:], None), strict=True):
      if b is None or b != a + 1:
        runs.append(str(start) if start == a else f"{start}..{a}")
        start = b
    return ", ".join(runs[:6]) + (", ..." if len(runs) > 6 else "")

  def to_z(self, number: int, flag: str) -> int:
    """The z of the user's slice `number`.

    Raises:
      VolumeError: no slice carries that number, naming `flag` and the valid numbers.
    """
    return self.to_zs([number], flag)[0]

  def to_zs(self, numbers: Sequence[int], flag: str) -> tuple[int, ...]:
    """The z of each of the user's slice numbers, in the order given.

    Raises:
      VolumeError: numbers no slice carries, naming `flag` and the valid numbers.
    """
    index = {n: z for z, n in enumerate(self.numbers or range(self.depth))}
    bad = [int(n) for n in numbers if int(n) not in index]
    if bad:
      what = "slice number" if len(bad) == 1 else "slice numbers"
      raise VolumeError(
        f"{flag}: no {what} {', '.join(map(str, bad[:10]))} in this stack; its slices are "
        f"numbered {self.describe()} (the numbers of its files, as ingest read them)"
      )
    return tuple(index[int(n)] for n in numbers)


def kvstore_spec(root: str | os.PathLike | Mapping[str, Any]) -> dict[str, Any]:
  """Returns a tensorstore kvstore spec for a volume root, with a trailing '/' path.

  Args:
    root: a local path, ``memory://name``, ``gs://bucket/path``, ``s3://bucket/path``,
      ``file://path`` or a kvstore spec dict.
  """
  if isinstance(root, Mapping):
    spec = dict(root)
  else:
    root = os.fspath(root)
    if root.startswith("memory://"):
      spec = {"driver": "memory", "path": root[len("memory://") :]}
    elif root.startswith("gs://"):
      bucket, _, path = root[len("gs://") :].partition("/")
      spec = {"driver": "gcs", "bucket": bucket, "path": path}
    elif root.startswith("s3://"):
      bucket, _, path = root[len("s3://") :].partition("/")
      spec = {"driver": "s3", "bucket": bucket, "path": path}
    else:
      if root.startswith("file://"):
        root = root[len("file://") :]
      spec = {"driver": "file", "path": os.path.abspath(root)}
  path = spec.get("path", "")
  if path and not path.endswith("/"):
    spec["path"] = path + "/"
  return spec


def describe(root: str | os.PathLike | Mapping[str, Any]) -> str:
  """A short human-readable name for a volume root, for messages."""
  if isinstance(root, Mapping):
    return json.dumps(dict(root))
  return os.fspath(root)


def child_spec(kvstore: Mapping[str, Any], name: str) -> dict[str, Any]:
  spec = dict(kvstore)
  spec["path"] = spec.get("path", "") + name + "/"
  return spec


def is_volume(path: str | os.PathLike) -> bool:
  """Whether a local path holds a volume written by this package (its group metadata)."""
  try:
    with open(os.path.join(os.fspath(path), "zarr.json")) as f:
      meta = json.load(f)
  except (OSError, ValueError):
    return False
  return (
    isinstance(meta, dict)
    and meta.get("node_type") == "group"
    and "fibseg_format" in (meta.get("attributes") or {})
  )


def local_path(root: str | os.PathLike | Mapping[str, Any]) -> str | None:
  """The local directory of a root on the file driver, else None."""
  spec = kvstore_spec(root)
  if spec["driver"] == "file":
    return spec["path"].rstrip("/")
  return None


def _read_group_attrs(kvstore: Mapping[str, Any], where: str) -> dict[str, Any]:
  kv = ts.KvStore.open(dict(kvstore), context=CONTEXT).result()
  result = kv.read("zarr.json").result()
  if result.state != "value":
    raise VolumeError(
      f"{where}: not a volume (no zarr.json group metadata). Expected a zarr v3 group "
      "written by `fibseg ingest` or `fibseg make-synthetic`"
    )
  try:
    meta = json.loads(result.value)
  except json.JSONDecodeError as e:
    raise VolumeError(f"{where}/zarr.json is not valid JSON: {e}") from e
  if meta.get("zarr_format") != 3 or meta.get("node_type") != "group":
    raise VolumeError(f"{where}/zarr.json is not a zarr v3 group")
  return meta.get("attributes", {})


def _write_group_attrs(kvstore: Mapping[str, Any], attrs: Mapping[str, Any]) -> None:
  kv = ts.KvStore.open(dict(kvstore), context=CONTEXT).result()
  doc = {"zarr_format": 3, "node_type": "group", "attributes": dict(attrs)}
  kv.write("zarr.json", json.dumps(doc, indent=1).encode()).result()


def group_attributes(root: str | os.PathLike | Mapping[str, Any]) -> dict[str, Any]:
  """All attributes of a volume's group, including ones beyond `VolumeMetadata` (e.g. the
  instrument's `slice_numbers` written by ingest)."""
  return _read_group_attrs(kvstore_spec(root), describe(root))


def slice_numbering(root: Any, depth: int) -> SliceNumbers:
  """The `SliceNumbers` of the volume at `root` (a segmentation's source), or number = z
  when there is none there (moved, deleted, or not a volume)."""
  if not root:
    return SliceNumbers.of((), depth)
  try:
    numbers = group_attributes(root).get("slice_numbers")
  except (VolumeError, ValueError, OSError):
    return SliceNumbers.of((), depth)
  return SliceNumbers.of(numbers, depth)


@dataclasses.dataclass(frozen=True)
class Volume:
  """An opened volume.

  Attributes:
    root: the root as given (for messages).
    kvstore: kvstore spec of the group.
    image: tensorstore [z, y, x, channel].
    labels: tensorstore [z, y, x] uint8, 255 = not annotated.
    metadata: the group attributes.
  """

  root: Any
  kvstore: dict[str, Any]
  image: ts.TensorStore
  labels: ts.TensorStore
  metadata: VolumeMetadata

  @property
  def shape(self) -> tuple[int, int, int]:
    """(z, y, x)."""
    return self.metadata.shape

  @property
  def channels(self) -> tuple[str, ...]:
    return self.metadata.channels

  @property
  def classes(self) -> tuple[str, ...]:
    return self.metadata.classes

  def channel_indices(self, names: Sequence[str], flag: str = "channels") -> list[int]:
    """Indices of the named channels; raises VolumeError naming the missing ones."""
    missing = [n for n in names if n not in self.channels]
    if missing:
      raise VolumeError(
        f"{flag}: channel(s) {missing} not in volume {describe(self.root)}, "
        f"which has {list(self.channels)}"
      )
    return [self.channels.index(n) for n in names]

  def normalization(self, names: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """(offset, scale) per named channel: x_norm = (x - offset) * scale lies mostly in [-1, 1].

    Uses the stored robust percentiles (0.5 and 99.5), so a few hot pixels do not set
    the range.
    """
    offsets, scales = [], []
    for name in names:
      stats = self.metadata.channel_stats.get(name)
      if not stats:
        raise VolumeError(
          f"volume {describe(self.root)} has no intensity statistics for channel {name!r}"
        )
      lo, hi = float(stats["p0.5"]), float(stats["p99.5"])
      offsets.append((lo + hi) / 2)
      # A (nearly) constant channel carries no contrast: centre it, do not blow it up.
      spread = hi - lo
      scales.append(2.0 / spread if spread > 1e-6 * max(1.0, abs(hi)) else 1.0)
    return np.asarray(offsets, np.float32), np.asarray(scales, np.float32)

  def read_image(self, z: slice | int, y: slice = slice(None), x: slice = slice(None)):
    """Reads image[z, y, x, :] synchronously as numpy."""
    return self.image[z, y, x].read().result()

  def read_labels(self, z: slice | int, y: slice = slice(None), x: slice = slice(None)):
    """Reads labels[z, y, x] synchronously as numpy uint8."""
    return self.labels[z, y, x].read().result()


def _open_array(spec: Mapping[str, Any], where: str, **kwargs) -> ts.TensorStore:
  try:
    return ts.open({"driver": "zarr3", "kvstore": dict(spec)}, context=CONTEXT, **kwargs).result()
  except ValueError as e:
    raise VolumeError(f"{where}: cannot open array: {e}") from e


def open_volume(
  root: str | os.PathLike | Mapping[str, Any], *, check_labels: bool = True
) -> Volume:
  """Opens and validates a volume.

  Args:
    root: see `kvstore_spec`.
    check_labels: read the annotated slices and check every label is a class index or 255.

  Returns:
    The opened `Volume`.

  Raises:
    VolumeError: naming the volume and what is wrong with it.
  """
  where = describe(root)
  if local_path(root) is not None and not os.path.isdir(local_path(root)):
    raise VolumeError(f"{where}: no such volume directory")
  kvstore = kvstore_spec(root)
  metadata = VolumeMetadata.from_json(_read_group_attrs(kvstore, where), where)
  image = _open_array(child_spec(kvstore, "image"), f"{where}/image", open=True)
  labels = _open_array(child_spec(kvstore, "labels"), f"{where}/labels", open=True)
  vol = Volume(root=root, kvstore=kvstore, image=image, labels=labels, metadata=metadata)
  _validate(vol, check_labels)
  return vol


def _validate(vol: Volume, check_labels: bool) -> None:
  where, meta = describe(vol.root), vol.metadata
  if vol.image.rank != 4:
    raise VolumeError(f"{where}/image must be [z, y, x, channel], got rank {vol.image.rank}")
  if vol.labels.rank != 3:
    raise VolumeError(f"{where}/labels must be [z, y, x], got rank {vol.labels.rank}")
  ishape, lshape = tuple(vol.image.shape), tuple(vol.labels.shape)
  if ishape[:3] != lshape:
    raise VolumeError(f"{where}: image {ishape} and labels {lshape} differ in [z, y, x]")
  if ishape[:3] != tuple(meta.shape):
    raise VolumeError(f"{where}: image shape {ishape} but metadata says {list(meta.shape)}")
  if ishape[3] != len(meta.channels):
    raise VolumeError(
      f"{where}: image has {ishape[3]} channels but metadata names {list(meta.channels)}"
    )
  if vol.image.dtype.name not in IMAGE_DTYPES:
    raise VolumeError(f"{where}/image dtype {vol.image.dtype.name}; expected one of {IMAGE_DTYPES}")
  if vol.labels.dtype.name != "uint8":
    raise VolumeError(f"{where}/labels dtype {vol.labels.dtype.name}; expected uint8")
  if len(meta.classes) >= IGNORE_LABEL:
    raise VolumeError(f"{where}: {len(meta.classes)} classes; at most 254 are supported")
  bad = [z for z in meta.annotated_slices if not 0 <= z < meta.shape[0]]
  if bad:
    raise VolumeError(f"{where}: annotated slices {bad} outside 0..{meta.shape[0] - 1}")
  if check_labels:
    for z in meta.annotated_slices:
      values = np.unique(vol.read_labels(z))
      wrong = [int(v) for v in values if v >= meta.num_classes and v != IGNORE_LABEL]
      if wrong:
        raise VolumeError(
          f"{where}: labels of slice {z} hold values {wrong}, but there are "
          f"{meta.num_classes} classes {list(meta.classes)} (valid: 0..{meta.num_classes - 1}"
          f" and {IGNORE_LABEL} = not annotated)"
        )


def _array_spec(
  kvstore: Mapping[str, Any], shape: Sequence[int], dtype: str, chunks: Sequence[int], fill: Any
) -> dict[str, Any]:
  return {
    "driver": "zarr3",
    "kvstore": dict(kvstore),
    "metadata": {
      "shape": list(shape),
      "data_type": dtype,
      "fill_value": fill,
      "chunk_grid": {"name": "regular", "configuration": {"chunk_shape": list(chunks)}},
      "codecs": [
        {"name": "bytes", "configuration": {"endian": "little"}},
        {"name": "zstd", "configuration": {"level": 1}},
      ],
    },
    "create": True,
    "delete_existing": True,
  }


class _ChannelStats:
  """Streaming robust per-channel statistics from a fixed random sample of each slice.

  The sample (64 Ki pixels a slice) keeps memory flat for any slice size; percentiles
  of it are within a small fraction of a grey level of the exact ones for real stacks.
  Past `_STATS_MAX_SAMPLES` the kept samples of every slice are halved (and so are
  those of later slices), so memory stays flat for any stack depth too and every slice
  keeps the same weight.
  """

  def __init__(self, num_channels: int, seed: int = 0):
    self._rng = np.random.default_rng(seed)
    self._samples: list[np.ndarray] = []
    self._per_slice = _STATS_SAMPLES_PER_SLICE
    self._count = 0

  def add(self, image_slice: np.ndarray) -> None:
    flat = image_slice.reshape(-1, image_slice.shape[-1])
    n = min(self._per_slice, flat.shape[0])
    idx = self._rng.choice(flat.shape[0], size=n, replace=False)
    self._samples.append(flat[idx].astype(np.float32))
    self._count += n
    while self._count > _STATS_MAX_SAMPLES and self._per_slice > 1:
      # The samples are in random order, so every other one is a random half.
      self._samples = [s[::2] for s in self._samples]
      self._per_slice //= 2
      self._count = sum(len(s) for s in self._samples)

  def result(self, channels: Sequence[str]) -> dict[str, dict[str, float]]:
    samples = np.concatenate(self._samples, 0).astype(np.float64)
    pct = np.percentile(samples, PERCENTILES, axis=0)
    mean, std = samples.mean(0), samples.std(0)
    out = {}
    for c, name in enumerate(channels):
      stats = {f"p{p:g}": float(pct[i, c]) for i, p in enumerate(PERCENTILES)}
      stats.update(mean=float(mean[c]), std=float(std[c]))
      out[name] = stats
    return out


class VolumeWriter:
  """Writes a volume slice by slice, then commits it.

  On a local path the volume is written to a hidden temporary sibling and renamed onto
  the destination only by `commit()`, so a failure leaves nothing at the destination.
  On other kvstores the group metadata is written last, so an interrupted write never
  opens as a volume. Use as a context manager: an exception aborts.

  With `ome_view` (the default) every slice also goes to the OME-NGFF view
  (``<root>/ome``, [c, z, y, x], labels as class + 1), whose coarser levels `commit`
  writes by reading level 0 back slice by slice; see `fibseg_jax.data.ome`.

  A local destination is claimed first (`fibseg_jax.outputs.claim`): it must not be or
  hold one of `inputs`, and only an earlier volume is replaced (with `overwrite`).
  Partial siblings of killed runs are removed and listed in `removed_partials`. `classes`
  may be empty: a stack to segment only, whose classes come from the model. A full disk
  raises `VolumeError` naming the path and about how much space the volume needs.

  Example:
    with create_volume("vol.zarr", shape=(16, 512, 512), dtype="uint16",
                       channels=("ICE", "TLD"), classes=("pore", "solid"),
                       voxel_size_nm=(50, 25, 25)) as w:
      for z in range(16):
        w.write_slice(z, image[z], labels.get(z))
  """

  def __init__(
    self,
    root: str | os.PathLike | Mapping[str, Any],
    *,
    shape: Sequence[int],
    dtype: str,
    channels: Sequence[str],
    classes: Sequence[str],
    voxel_size_nm: Sequence[float],
    chunk_yx: int = DEFAULT_CHUNK_YX,
    overwrite: bool = False,
    ome_view: bool = True,
    inputs: Mapping[str, Any] = {},
    flag: str = "--out",
  ):
    if dtype not in IMAGE_DTYPES:
      raise VolumeError(f"image dtype {dtype!r} not supported; expected one of {IMAGE_DTYPES}")
    if len(shape) != 3 or min(shape) < 1:
      raise VolumeError(f"volume shape must be (z, y, x) with positive sizes, got {shape}")
    if len(set(channels)) != len(channels) or not channels:
      raise VolumeError(f"channel names must be unique and non-empty, got {list(channels)}")
    if len(classes) >= IGNORE_LABEL:
      raise VolumeError(f"at most 254 class names, got {len(classes)}")
    if len(voxel_size_nm) != 3 or min(voxel_size_nm) <= 0:
      raise VolumeError(f"voxel size must be 3 positive numbers (z, y, x), got {voxel_size_nm}")
    self.root = root
    self.removed_partials: list[tuple[str, int]] = []
    self._final = local_path(root)
    where = describe(root)
    self._flag = flag
    if self._final is not None:
      try:
        outputs.claim(
          self._final,
          kind="volume",
          flag=flag,
          inputs=inputs,
          is_own=is_volume,
          overwrite=overwrite,
        )
      except outputs.OutputError as e:
        raise VolumeError(str(e)) from e
      self.removed_partials = outputs.remove_stale_partials(self._final)
      self._tmp = outputs.partial_sibling(self._final)
      self.kvstore = kvstore_spec(self._tmp)
    else:
      self._tmp = None
      self.kvstore = kvstore_spec(root)
      kv = ts.KvStore.open(dict(self.kvstore), context=CONTEXT).result()
      # Any key under the prefix, not only a volume's zarr.json: `abort()` deletes the
      # whole prefix, which must never take data that was there before.
      if kv.list().result():
        try:
          _read_group_attrs(self.kvstore, where)["fibseg_format"]
        except (VolumeError, KeyError):
          raise VolumeError(
            f"{flag}={where} holds data that is not a fibseg volume; fibseg replaces only "
            "its own outputs, with or without --overwrite: choose another path"
          ) from None
        if not overwrite:
          raise VolumeError(
            f"{flag}={where} already exists; pass --overwrite to replace it (it is an "
            "earlier fibseg volume)"
          )
        kv.delete_range(ts.KvStore.KeyRange()).result()
    z, y, x = (int(s) for s in shape)
    cy, cx = min(chunk_yx, y), min(chunk_yx, x)
    self.shape = (z, y, x)
    self.dtype = dtype
    self.channels = tuple(channels)
    self.classes = tuple(classes)
    self.voxel_size_nm = tuple(float(v) for v in voxel_size_nm)
    self.image = ts.open(
      _array_spec(
        child_spec(self.kvstore, "image"),
        (z, y, x, len(channels)),
        dtype,
        (1, cy, cx, len(channels)),
        0,
      ),
      context=CONTEXT,
    ).result()
    self.labels = ts.open(
      _array_spec(
        child_spec(self.kvstore, "labels"), (z, y, x), "uint8", (1, cy, cx), IGNORE_LABEL
      ),
      context=CONTEXT,
    ).result()
    self._view = (
      _OmeViewWriter(self.kvstore, self.shape, dtype, len(channels), self.voxel_size_nm)
      if ome_view
      else None
    )
    self._stats = _ChannelStats(len(channels))
    self._annotated: set[int] = set()
    self._written: set[int] = set()
    self._pending: list[list[ts.Future]] = []  # the writes of each slice in flight
    self.committed = False

  def _disk_full(self, error: BaseException) -> VolumeError:
    """The one-line error for a full disk, with the size extrapolated from what was written."""
    needed = None
    if self._tmp is not None and self._written:
      done = outputs.dir_size(self._tmp)
      needed = done * self.shape[0] / len(self._written)
    self.abort()  # first, so the free space the message names is what a rerun has
    return VolumeError(outputs.disk_full_message(self._flag, describe(self.root), needed, "volume"))

  def write_slice(self, z: int, image: np.ndarray, labels: np.ndarray | None = None) -> None:
    """Writes one slice; a full disk raises `VolumeError` (see the class doc)."""
    try:
      self._write_slice(z, image, labels)
    except Exception as e:
      if outputs.is_disk_full(e):
        raise self._disk_full(e) from e
      raise

  def _write_slice(self, z: int, image: np.ndarray, labels: np.ndarray | None = None) -> None:
    """Writes one slice.

    Args:
      z: slice index.
      image: [y, x, channel] (or [y, x] for one channel) in the volume dtype.
      labels: optional [y, x] integer labels; 255 = not annotated.
    """
    if image.ndim == 2:
      image = image[..., None]
    expect = (*self.shape[1:], len(self.channels))
    if image.shape != expect:
      raise VolumeError(f"slice {z}: image shape {image.shape}, expected {expect}")
    if labels is not None and labels.shape != self.shape[1:]:
      raise VolumeError(f"slice {z}: labels shape {labels.shape}, expected {self.shape[1:]}")
    # Keep at most a couple of slices in flight so memory does not grow with the stack.
    self._drain(keep=2)
    image = image.astype(self.dtype, copy=False)
    writes = [self.image[z].write(image)]
    self._stats.add(image)
    self._written.add(z)
    if labels is not None:
      writes.append(self.labels[z].write(labels.astype(np.uint8)))
      self._annotated.add(z)
    if self._view is not None:
      writes += self._view.write_slice(z, image, labels)
    self._pending.append(writes)

  def _drain(self, keep: int = 0) -> None:
    while len(self._pending) > keep:
      writes = self._pending[0]
      for f in writes:
        f.result()  # on failure the slice stays pending, so `abort` waits for all of it
      self._pending.pop(0)

  def commit(self, extra_attrs: Mapping[str, Any] | None = None) -> VolumeMetadata:
    """Finishes the volume: writes metadata, moves it into place. Returns its metadata."""
    try:
      return self._commit(extra_attrs)
    except Exception as e:
      if outputs.is_disk_full(e):
        raise self._disk_full(e) from e
      raise

  def _commit(self, extra_attrs: Mapping[str, Any] | None) -> VolumeMetadata:
    self._drain()
    missing = sorted(set(range(self.shape[0])) - self._written)
    if missing:
      raise VolumeError(f"{describe(self.root)}: slices {missing[:10]} were never written")
    metadata = VolumeMetadata(
      shape=self.shape,
      channels=self.channels,
      classes=self.classes,
      voxel_size_nm=self.voxel_size_nm,
      annotated_slices=tuple(sorted(self._annotated)),
      channel_stats=self._stats.result(self.channels),
      dtype=self.dtype,
    )
    attrs = metadata.to_json()
    if self._view is not None:
      self._view.finish(metadata)
      attrs["ome_view"] = ome.VIEW
    attrs.update(extra_attrs or {})
    _write_group_attrs(self.kvstore, attrs)
    if self._tmp is not None:
      outputs.replace(self._tmp, self._final)
    self.committed = True
    return metadata

  def abort(self) -> None:
    """Drops everything written so far."""
    for f in (f for writes in self._pending for f in writes):
      try:
        f.result()
      except Exception:  # noqa: BLE001 - already failing; clean up regardless
        pass
    self._pending.clear()
    if self._tmp is not None:
      shutil.rmtree(self._tmp, ignore_errors=True)
    else:
      kv = ts.KvStore.open(dict(self.kvstore), context=CONTEXT).result()
      kv.delete_range(ts.KvStore.KeyRange()).result()

  def __enter__(self) -> VolumeWriter:
    return self

  def __exit__(self, exc_type, exc, tb) -> None:
    if exc_type is not None or not self.committed:
      self.abort()


def create_volume(root: str | os.PathLike | Mapping[str, Any], **kwargs) -> VolumeWriter:
  """Starts writing a new volume at `root`; see `VolumeWriter` for the arguments."""
  return VolumeWriter(root, **kwargs)


class _OmeViewWriter:
  """The OME-NGFF view of a volume (``<root>/ome``): image [c, z, y, x] and the labels
  as an image-label [z, y, x] (class + 1, 0 = not annotated), with pyramids."""

  def __init__(
    self,
    kvstore: Mapping[str, Any],
    shape: Sequence[int],
    dtype: str,
    num_channels: int,
    voxel_size_nm: Sequence[float],
  ):
    self.kvstore = ome.group_spec(kvstore, ome.VIEW)
    self.pyramid = ome.pyramid(shape, voxel_size_nm)
    kw = dict(context=_OME_CONTEXT)
    self.image = ome.MultiscaleWriter(
      self.kvstore, self.pyramid, dtype=dtype, channels=num_channels, fill=0, **kw
    )
    self.labels = ome.MultiscaleWriter(
      ome.group_spec(self.kvstore, f"labels/{ome.ANNOTATIONS}"),
      self.pyramid,
      dtype="uint8",
      channels=None,
      fill=ome.NOT_LABELLED,
      **kw,
    )

  def write_slice(self, z: int, image: np.ndarray, labels: np.ndarray | None) -> list[ts.Future]:
    """Writes slice z: image [y, x, channel], labels [y, x] (255 = not annotated) or None."""
    writes = [self.image.write_slice(z, np.moveaxis(image, -1, 0))]
    if labels is not None:
      writes.append(self.labels.write_slice(z, ome.label_values(labels, IGNORE_LABEL)))
    return writes

  def finish(self, metadata: VolumeMetadata) -> None:
    """Writes the coarser levels and the NGFF metadata of the image and its labels."""
    windows = []
    for name in metadata.channels:
      stats = metadata.channel_stats.get(name, {})
      start, end = float(stats.get("p0.5", 0.0)), float(stats.get("p99.5", 1.0))
      if np.issubdtype(np.dtype(metadata.dtype), np.integer):
        info = np.iinfo(np.dtype(metadata.dtype))
        lo, hi = float(info.min), float(info.max)
      else:
        lo, hi = start, end
      windows.append((lo, hi, start, end))
    self.image.finish(
      ome.image_attributes(self.pyramid, name="image", channels=metadata.channels, windows=windows),
      averaged=True,
    )
    self.labels.finish(
      ome.label_attributes(self.pyramid, name=ome.ANNOTATIONS, classes=metadata.classes),
      averaged=False,
    )
    ome.write_group(
      ome.group_spec(self.kvstore, "labels"),
      ome.labels_group_attributes([ome.ANNOTATIONS]),
      _OME_CONTEXT,
    )


def write_labels(
  root: str | os.PathLike | Mapping[str, Any], slices: Mapping[int, np.ndarray]
) -> VolumeMetadata:
  """Replaces the hand labels of whole slices of an existing volume, crash-safe.

  A slice holding at least one label becomes (or stays) annotated; one holding none
  leaves `annotated_slices`. The order makes a crash harmless: the slices are first
  taken off the annotated list, then written (and their OME view, if any), then listed
  again. A slice cut off half-way is not listed, so nothing trains on it, and writing
  again completes it.

  Args:
    root: the volume.
    slices: z -> labels [y, x] (class index, 255 = not annotated).

  Returns:
    The volume's new metadata.

  Raises:
    VolumeError: a slice outside the stack, a shape other than the volume's [y, x], or
      a value that is neither a class index nor 255.
  """
  vol = open_volume(root, check_labels=False)
  meta, where = vol.metadata, describe(root)
  checked = {}
  for z, labels in slices.items():
    z, labels = int(z), np.asarray(labels)
    if not 0 <= z < meta.shape[0]:
      raise VolumeError(f"{where}: slice {z} is outside 0..{meta.shape[0] - 1}")
    if labels.shape != tuple(meta.shape[1:]):
      raise VolumeError(
        f"{where}: labels of slice {z} are {list(labels.shape)}; the volume's slices are "
        f"{list(meta.shape[1:])}"
      )
    values = np.unique(labels)
    wrong = [int(v) for v in values if v >= meta.num_classes and v != IGNORE_LABEL]
    if wrong or values.min(initial=0) < 0:
      raise VolumeError(
        f"{where}: labels of slice {z} hold values {wrong or [int(values.min())]}; valid are "
        f"0..{meta.num_classes - 1} ({', '.join(meta.classes)}) and {IGNORE_LABEL} = not annotated"
      )
    checked[z] = labels.astype(np.uint8)
  if not checked:
    return meta
  attrs = _read_group_attrs(vol.kvstore, where)
  listed = set(meta.annotated_slices)
  attrs["annotated_slices"] = sorted(listed - set(checked))
  _write_group_attrs(vol.kvstore, attrs)
  for z, labels in checked.items():
    vol.labels[z].write(labels).result()
  if attrs.get("ome_view"):
    view = ome.group_spec(vol.kvstore, f"{attrs['ome_view']}/labels/{ome.ANNOTATIONS}")
    pyr = ome.pyramid(meta.shape, meta.voxel_size_nm)
    for z, labels in checked.items():
      ome.rewrite_label_slice(view, pyr, z, ome.label_values(labels, IGNORE_LABEL), _OME_CONTEXT)
  painted = {z for z, labels in checked.items() if (labels != IGNORE_LABEL).any()}
  attrs["annotated_slices"] = sorted((listed - set(checked)) | painted)
  _write_group_attrs(vol.kvstore, attrs)
  return VolumeMetadata.from_json(attrs, where)


def add_ome_view(root: str | os.PathLike | Mapping[str, Any]) -> str:
  """Writes (or rewrites) the OME-NGFF view of an existing volume, slice by slice.

  Volumes written before the view existed, or with ``ome_view=False``, get one this way.

  Returns:
    The path (or description) of the view, ``<root>/ome``.

  Raises:
    VolumeError: `root` is not a volume.
  """
  vol = open_volume(root, check_labels=False)
  meta = vol.metadata
  view = _OmeViewWriter(vol.kvstore, meta.shape, meta.dtype, len(meta.channels), meta.voxel_size_nm)
  annotated = set(meta.annotated_slices)
  for z in range(meta.shape[0]):
    labels = vol.read_labels(z) if z in annotated else None
    for f in view.write_slice(z, vol.read_image(z), labels):
      f.result()
  view.finish(meta)
  attrs = _read_group_attrs(vol.kvstore, describe(root))
  attrs["ome_view"] = ome.VIEW
  _write_group_attrs(vol.kvstore, attrs)
  return f"{describe(root).rstrip('/')}/{ome.VIEW}"
