"""Ingest per-slice detector images (TIFF, PNG) and hand labels into one volume.

A dual-beam instrument writes one image file per slice and detector, e.g.
``ICE/slice_0001.tif``, ``TLD/slice_0001.tif``. Slices are ordered by the last integer
in the file name; a label file belongs to the image slice with the same number. A
channel may also be one multi-page TIFF holding the whole stack (page i = slice i).
Everything streams slice by slice, so memory does not grow with the stack.
"""

from __future__ import annotations

import dataclasses
import glob
import os
import re
from collections.abc import Callable, Mapping, Sequence

import imageio.v3 as iio
import numpy as np
import tifffile
from tqdm import tqdm

from fibseg_jax.data import volume as volume_lib

IMAGE_EXTENSIONS = (".tif", ".tiff", ".png")
_LAST_INT = re.compile(r"(\d+)(?!.*\d)")


class IngestError(ValueError):
  """A user mistake in the inputs of an ingest; the message names the file or flag."""


@dataclasses.dataclass(frozen=True)
class SliceFile:
  """One slice of one signal: its number and how to read it."""

  number: int
  path: str
  page: int | None = None  # page of a multi-page TIFF, None for a single image

  def describe(self) -> str:
    return self.path if self.page is None else f"{self.path} (page {self.page})"

  def read(self) -> np.ndarray:
    """Reads the slice as a 2D [y, x] array, raising IngestError naming the file."""
    try:
      if self.page is not None:
        with tifffile.TiffFile(self.path) as tif:
          data = tif.pages[self.page].asarray()
      elif self.path.lower().endswith((".tif", ".tiff")):
        data = tifffile.imread(self.path)
      else:
        data = iio.imread(self.path)
    except Exception as e:  # noqa: BLE001 - any decoder failure is the file's fault
      raise IngestError(f"{self.describe()}: cannot read image: {e}") from e
    return _as_grayscale(np.asarray(data), self.describe())


def _as_grayscale(data: np.ndarray, where: str) -> np.ndarray:
  if data.size == 0:
    raise IngestError(f"{where}: image is empty")
  if data.ndim == 3 and data.shape[-1] in (3, 4):
    # Viewers often save grayscale as RGB(A); accept it only when it really is gray.
    rgb = data[..., :3]
    if not (np.array_equal(rgb[..., 0], rgb[..., 1]) and np.array_equal(rgb[..., 0], rgb[..., 2])):
      raise IngestError(f"{where}: colour image; expected a single-channel (grayscale) image")
    data = rgb[..., 0]
  if data.ndim != 2:
    raise IngestError(f"{where}: expected a 2D single-channel image, got shape {data.shape}")
  return data


def slice_number(path: str) -> int:
  """The last integer in a file name (not its directory), e.g. 'ICE_s0012.tif' -> 12."""
  stem = os.path.splitext(os.path.basename(path))[0]
  match = _LAST_INT.search(stem)
  if match is None:
    raise IngestError(f"{path}: no slice number in the file name (expected e.g. slice_0012.tif)")
  return int(match.group(1))


def find_slices(pattern: str, flag: str) -> list[SliceFile]:
  """Expands a glob into slices ordered by number.

  A single multi-page TIFF stands for the whole stack, numbered by page from 0.

  Raises:
    IngestError: nothing matches, a file has no number, two files share a number.
  """
  paths = sorted(p for p in glob.glob(os.path.expanduser(pattern)) if os.path.isfile(p))
  if not paths:
    raise IngestError(f"{flag}: no files match {pattern!r}")
  bad_ext = [p for p in paths if not p.lower().endswith(IMAGE_EXTENSIONS)]
  if bad_ext:
    raise IngestError(f"{flag}: {bad_ext[0]} is not a TIFF or PNG file ({IMAGE_EXTENSIONS})")
  if len(paths) == 1 and paths[0].lower().endswith((".tif", ".tiff")):
    pages = _tiff_pages(paths[0])
    if pages > 1:
      return [SliceFile(number=i, path=paths[0], page=i) for i in range(pages)]
  files: dict[int, SliceFile] = {}
  for path in paths:
    number = slice_number(path)
    if number in files:
      raise IngestError(f"{flag}: {files[number].path} and {path} both carry slice number {number}")
    files[number] = SliceFile(number=number, path=path)
  return [files[n] for n in sorted(files)]


def _tiff_pages(path: str) -> int:
  try:
    with tifffile.TiffFile(path) as tif:
      series = tif.series[0] if tif.series else None
      if series is not None and len(series.shape) == 3 and series.shape[-1] not in (3, 4):
        return len(tif.pages)
      return 1
  except Exception as e:  # noqa: BLE001
    raise IngestError(f"{path}: cannot read TIFF: {e}") from e


def _image_dtype(dtypes: Sequence[np.dtype], where: str) -> str:
  """The volume dtype that holds every channel without loss."""
  names = {np.dtype(d).name for d in dtypes}
  for name in names:
    if name not in ("uint8", "uint16", "float32", "float64", "int16", "int32", "uint32"):
      raise IngestError(f"{where}: pixel type {name} not supported (uint8, uint16, float32)")
  if names <= {"uint8"}:
    return "uint8"
  if names <= {"uint8", "uint16"}:
    return "uint16"
  return "float32"


@dataclasses.dataclass(frozen=True)
class IngestPlan:
  """What an ingest will write, checked before any pixel is written."""

  channels: dict[str, list[SliceFile]]
  labels: dict[int, SliceFile]  # z index -> label file
  numbers: list[int]  # slice number of each z
  shape: tuple[int, int, int]
  dtype: str
  classes: tuple[str, ...]


def plan_ingest(
  channels: Mapping[str, str], labels: str | None, classes: Sequence[str] | None
) -> IngestPlan:
  """Matches files across channels and labels; checks counts, numbers and shapes.

  Args:
    channels: channel name -> glob of its slice files, in channel order.
    labels: glob of label files, or None.
    classes: class names, or None to name them from the label values.

  Raises:
    IngestError: naming the file and the flag.
  """
  if not channels:
    raise IngestError("--channel: give at least one, e.g. --channel=ICE='data/ice/*.tif'")
  found = {name: find_slices(pattern, f"--channel={name}") for name, pattern in channels.items()}
  first_name, first = next(iter(found.items()))
  numbers = [f.number for f in first]
  for name, files in found.items():
    if len(files) != len(first):
      raise IngestError(
        f"--channel={name} has {len(files)} slices but --channel={first_name} has {len(first)}"
      )
    mismatch = [(a, b) for a, b in zip(first, files, strict=True) if a.number != b.number]
    if mismatch:
      a, b = mismatch[0]
      raise IngestError(
        f"--channel={name}: slice numbers differ from --channel={first_name}: "
        f"{b.describe()} (number {b.number}) vs {a.describe()} (number {a.number})"
      )
  # Shapes and dtypes from the first slice of each channel; every slice is re-checked
  # as it streams.
  shapes, dtypes = {}, []
  for name, files in found.items():
    data = files[0].read()
    shapes[name] = data.shape
    dtypes.append(data.dtype)
  if len(set(shapes.values())) > 1:
    raise IngestError(f"channels differ in slice shape (y, x): {shapes}")
  y, x = next(iter(shapes.values()))
  dtype = _image_dtype(dtypes, "--channel")

  label_files: dict[int, SliceFile] = {}
  if labels:
    index_of = {n: z for z, n in enumerate(numbers)}
    for f in find_slices(labels, "--labels"):
      if f.number not in index_of:
        raise IngestError(
          f"--labels: {f.describe()} has slice number {f.number} but no image slice has it "
          f"(image numbers {numbers[0]}..{numbers[-1]})"
        )
      label_files[index_of[f.number]] = f
  if classes is not None:
    classes = tuple(c.strip() for c in classes if c.strip())
    if not classes:
      raise IngestError("--classes: give the class names, e.g. --classes=pore,csh,portlandite")
    if len(set(classes)) != len(classes):
      raise IngestError(f"--classes: names must be unique, got {list(classes)}")
    if len(classes) >= volume_lib.IGNORE_LABEL:
      raise IngestError(f"--classes: at most 254 classes, got {len(classes)}")
  return IngestPlan(
    channels=found,
    labels=label_files,
    numbers=numbers,
    shape=(len(numbers), int(y), int(x)),
    dtype=dtype,
    classes=classes or (),
  )


def _check_labels(data: np.ndarray, f: SliceFile, shape: tuple[int, int], classes) -> np.ndarray:
  if data.shape != shape:
    raise IngestError(f"--labels: {f.describe()} has shape {data.shape}, image slices {shape}")
  if not np.issubdtype(data.dtype, np.integer):
    if not np.all(np.equal(np.mod(data, 1), 0)):
      raise IngestError(f"--labels: {f.describe()} holds non-integer values")
  values = np.unique(data)
  wrong = [int(v) for v in values if (v < 0 or v >= len(classes)) and v != 255]
  if wrong:
    raise IngestError(
      f"--labels: {f.describe()} holds label values {wrong[:10]} but --classes names "
      f"{len(classes)} classes {list(classes)} (valid: 0..{len(classes) - 1}, 255 = not "
      "annotated); pass one name per label value"
    )
  return data.astype(np.uint8)


def _infer_classes(plan: IngestPlan) -> tuple[str, ...]:
  top = -1
  for f in plan.labels.values():
    values = np.unique(f.read())
    values = values[values != 255]
    if values.size:
      top = max(top, int(values.max()))
  if top < 0:
    raise IngestError("--classes: not given and the label files hold no class values")
  return tuple(f"class{i}" for i in range(top + 1))


def ingest(
  plan: IngestPlan,
  out: str,
  *,
  voxel_size_nm: Sequence[float],
  overwrite: bool = False,
  progress: bool = True,
  on_slice: Callable[[int], None] | None = None,
) -> volume_lib.VolumeMetadata:
  """Streams the planned slices into a new volume at `out`.

  Writes to a temporary sibling and renames on success: a failure leaves nothing.

  Args:
    plan: from `plan_ingest`.
    out: volume root (path or kvstore URL).
    voxel_size_nm: (z, y, x).
    overwrite: replace an existing volume.
    progress: show a progress bar.
    on_slice: called with each z after it is queued (tests use it to interrupt).

  Returns:
    The metadata of the written volume.
  """
  classes = plan.classes or _infer_classes(plan)
  names = list(plan.channels)
  try:
    writer = volume_lib.create_volume(
      out,
      shape=plan.shape,
      dtype=plan.dtype,
      channels=names,
      classes=classes,
      voxel_size_nm=voxel_size_nm,
      overwrite=overwrite,
    )
  except volume_lib.VolumeError as e:
    raise IngestError(f"--out: {e}") from e
  with writer:
    for z in tqdm(range(plan.shape[0]), desc="ingest", unit="slice", disable=not progress):
      planes = []
      for name in names:
        f = plan.channels[name][z]
        data = f.read()
        if data.shape != plan.shape[1:]:
          raise IngestError(
            f"--channel={name}: {f.describe()} has shape {data.shape}, "
            f"expected {plan.shape[1:]} like the first slice"
          )
        planes.append(data)
      image = np.stack(planes, axis=-1)
      labels = None
      if z in plan.labels:
        f = plan.labels[z]
        labels = _check_labels(f.read(), f, plan.shape[1:], classes)
      writer.write_slice(z, image, labels)
      if on_slice is not None:
        on_slice(z)
    return writer.commit(
      extra_attrs={
        "slice_numbers": plan.numbers,
        "sources": {n: plan.channels[n][0].path for n in names},
      }
    )
