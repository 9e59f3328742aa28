"""Ingest per-slice detector images (TIFF, PNG) and hand labels into one volume.

A dual-beam instrument writes one image file per slice and detector, e.g.
``ICE/slice_0001.tif``, ``TLD/slice_0001.tif``. Slices are ordered by the last integer
in the file name; a label file belongs to the image slice with the same number. A
channel (or the labels) may also be one multi-page TIFF holding the whole stack (page i
= slice i). Label images hold class indices; an indexed-colour (palette) PNG or TIFF is
read as its indices, as annotation tools write them. Two conventions for the label
values (`ingest(unlabelled=...)`, `fibseg ingest --labels_unlabelled`): 255 = not
annotated and classes 0..K-1 (the volume's own), or 0 = not painted and classes 1..K, as
napari's and ilastik's label layers write them; the second is shifted down by one on
reading, so both write the same volume. Labels may be strokes or a few regions (any share
of a slice unlabelled), and may exist for any subset of the image slices (e.g. every Nth).
A label slice with no class value is not annotated.

Every slice's shape and pixel type are read from the file headers and checked before a
pixel is written; the pixels then stream slice by slice, so memory does not grow with
the stack.
"""

from __future__ import annotations

import contextlib
import dataclasses
import glob
import logging
import os
import re
from collections.abc import Callable, Mapping, Sequence

import imageio.v3 as iio
import numpy as np
import tifffile

from fibseg_jax.data import volume as volume_lib
from fibseg_jax.progress import Bar

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

  def read(self, *, labels: bool = False) -> np.ndarray:
    """Reads the slice as a 2D [y, x] array, raising IngestError naming the file.

    Args:
      labels: the file holds class indices: an indexed-colour (palette) PNG gives its
        indices, not the colours the palette maps them to.
    """
    try:
      if self.page is not None:
        with tifffile.TiffFile(self.path) as tif:
          data = tif.pages[self.page].asarray()
      elif _is_tiff(self.path):
        data = tifffile.imread(self.path)  # palette TIFFs come back as indices
      elif labels and iio.immeta(self.path).get("mode") == "P":
        data = iio.imread(self.path, mode="P")  # the indices, not the palette's colours
      else:
        data = iio.imread(self.path)
    except Exception as e:  # noqa: BLE001 - any decoder failure is the file's fault
      raise IngestError(f"{self.describe()}: cannot read image: {e}") from e
    return _as_grayscale(np.asarray(data), self.describe())


def _is_tiff(path: str) -> bool:
  return path.lower().endswith((".tif", ".tiff"))


def read_headers(files: Sequence[SliceFile]) -> list[tuple[tuple[int, ...], np.dtype]]:
  """The (y, x) shape and pixel type of every slice, from the file headers alone.

  A multi-page TIFF is opened once for all its pages. The shape is what `read` returns
  (length-1 axes dropped; colour samples dropped, `read` checks they are gray).

  Raises:
    IngestError: a file that cannot be opened, named.
  """
  headers = []
  with contextlib.ExitStack() as stack:
    stacks: dict[str, tifffile.TiffFile] = {}
    for f in files:
      try:
        if f.page is not None:
          if f.path not in stacks:
            stacks[f.path] = stack.enter_context(tifffile.TiffFile(f.path))
          page = stacks[f.path].pages[f.page]
          shape, dtype = page.shape, page.dtype
        elif _is_tiff(f.path):
          with tifffile.TiffFile(f.path) as tif:
            shape, dtype = tif.series[0].shape, tif.series[0].dtype
        else:
          props = iio.improps(f.path)  # header only, no pixel decoding
          shape, dtype = props.shape, props.dtype
      except Exception as e:  # noqa: BLE001 - any decoder failure is the file's fault
        raise IngestError(f"{f.describe()}: cannot read image: {e}") from e
      shape = _squeeze(shape)
      if len(shape) == 3 and shape[-1] in (3, 4):
        shape = shape[:2]  # RGB(A); `read` checks that it is gray
      dtype = np.dtype(dtype)
      headers.append((shape, np.dtype("uint8") if dtype == np.bool_ else dtype))
  return headers


def _squeeze(shape: Sequence[int]) -> tuple[int, ...]:
  """Drops the length-1 axes writers put around a 2D image: (1, y, x), (y, x, 1)."""
  shape = tuple(int(n) for n in shape)
  while len(shape) > 2 and shape[0] == 1:
    shape = shape[1:]
  if len(shape) == 3 and shape[-1] == 1:
    shape = shape[:2]
  return shape


def _as_grayscale(data: np.ndarray, where: str) -> np.ndarray:
  if data.size == 0:
    raise IngestError(f"{where}: image is empty")
  data = data.reshape(_squeeze(data.shape))
  if data.dtype == np.bool_:
    data = data.astype(np.uint8)  # 1-bit images
  if data.ndim == 3 and data.shape[-1] in (3, 4):
    # Viewers often save grayscale as RGB(A); accept it only when it really is gray.
    rgb = data[..., :3]
    if not (np.array_equal(rgb[..., 0], rgb[..., 1]) and np.array_equal(rgb[..., 0], rgb[..., 2])):
      raise IngestError(f"{where}: colour image; expected a single-channel (grayscale) image")
    data = rgb[..., 0]
  if data.ndim != 2:
    raise _not_2d(data.shape, where)
  return data


def _not_2d(shape: tuple[int, ...], where: str) -> IngestError:
  hint = " (a multi-page TIFF stack must be the only file its glob matches)"
  return IngestError(
    f"{where}: expected a 2D single-channel image, got shape {shape}"
    + (hint if len(shape) == 3 and shape[-1] > 4 else "")
  )


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
  if len(paths) == 1 and _is_tiff(paths[0]):
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


def _match_channels(found: Mapping[str, list[SliceFile]]) -> None:
  """Every channel must hold the same slice numbers; names what one lacks."""
  (first_name, first), *others = found.items()
  have = {f.number: f for f in first}
  for name, files in others:
    theirs = {f.number: f for f in files}
    lacks = sorted(set(have) - set(theirs))
    extra = sorted(set(theirs) - set(have))
    if not lacks and not extra:
      continue
    parts = []
    if lacks:
      parts.append(
        f"--channel={name} lacks slice number(s) {lacks[:10]} that --channel={first_name} "
        f"has ({', '.join(have[n].describe() for n in lacks[:3])})"
      )
    if extra:
      parts.append(
        f"--channel={name} has slice number(s) {extra[:10]} that --channel={first_name} "
        f"lacks ({', '.join(theirs[n].describe() for n in extra[:3])})"
      )
    raise IngestError(
      f"--channel={name} has {len(files)} slices, --channel={first_name} {len(first)}: "
      + "; ".join(parts)
    )


def missing_slices(files: Sequence[SliceFile]) -> list[tuple[SliceFile, SliceFile, list[int]]]:
  """Jumps in the slice numbering: (file before, file after, numbers missing between).

  The step of the numbering is the most common difference between neighbours (1 for
  slice_0001, slice_0002, ...; 500 for names that carry z = 0.0500 um). A jump of k >= 2
  steps leaves k - 1 slices out. Irregular spacing (not a multiple of the step) is not
  reported: the numbers may then be positions that were rounded.
  """
  if len(files) < 3:
    return []
  numbers = np.array([f.number for f in files])
  diffs = np.diff(numbers)
  values, counts = np.unique(diffs, return_counts=True)
  step = int(values[np.argmax(counts)])  # ties go to the smaller step
  return [
    (a, b, list(range(a.number + step, b.number, step)))
    for a, b, d in zip(files[:-1], files[1:], diffs, strict=True)
    if d > step and d % step == 0
  ]


@dataclasses.dataclass(frozen=True)
class IngestPlan:
  """What an ingest will write, checked before any pixel is written."""

  channels: dict[str, list[SliceFile]]
  labels: dict[int, SliceFile]  # z index -> label file
  numbers: list[int]  # slice number of each z
  shape: tuple[int, int, int]
  dtype: str
  classes: tuple[str, ...]
  channel_dtypes: dict[str, str] = dataclasses.field(default_factory=dict)


def plan_ingest(
  channels: Mapping[str, str],
  labels: str | None,
  classes: Sequence[str] | None,
  *,
  allow_missing_slices: bool = False,
) -> IngestPlan:
  """Matches files across channels and labels; checks numbers, shapes and pixel types.

  Every slice's shape and pixel type come from its file header, so a wrong slice is
  found before anything is written, wherever it is in the stack.

  Args:
    channels: channel name -> glob of its slice files, in channel order.
    labels: glob of label files, or None.
    classes: class names, or None to name them from the label values.
    allow_missing_slices: stack the slices as they are when the numbering jumps
      (e.g. 1, 2, 4: slice 3 missing) instead of refusing.

  Raises:
    IngestError: naming the file and the flag.
  """
  if not channels:
    raise IngestError("--channel: give at least one, e.g. --channel=ICE='data/ice/*.tif'")
  found = {name: find_slices(pattern, f"--channel={name}") for name, pattern in channels.items()}
  _match_channels(found)
  first_name, first = next(iter(found.items()))
  numbers = [f.number for f in first]
  gaps = [] if allow_missing_slices else missing_slices(first)
  if gaps:
    a, b, missing = gaps[0]
    more = f" (and {len(gaps) - 1} more gap(s))" if len(gaps) > 1 else ""
    raise IngestError(
      f"--channel={first_name}: slice number(s) {missing[:10]} missing between "
      f"{a.describe()} and {b.describe()}{more}; add the missing file(s), or pass "
      "--allow_missing_slices to stack the slices as they are"
    )
  # Shapes and pixel types of every slice, from the headers.
  reference = None
  channel_dtypes = {}
  for name, files in found.items():
    headers = read_headers(files)
    if reference is None:
      reference = (files[0], headers[0][0])
    ref_file, ref_shape = reference
    for f, (shape, dtype) in zip(files, headers, strict=True):
      if len(shape) != 2:
        raise _not_2d(shape, f.describe())
      if shape != ref_shape:
        raise IngestError(
          f"--channel={name}: {f.describe()} has shape {shape}, expected {ref_shape} like "
          f"{ref_file.describe()}"
        )
      if dtype != headers[0][1]:
        # A slice exported at another bit depth would be cast (wrapped or truncated) or
        # would scale differently from its neighbours: refuse rather than guess.
        raise IngestError(
          f"--channel={name}: {f.describe()} is {dtype.name} but {files[0].describe()} is "
          f"{headers[0][1].name}; every slice of a channel needs the same pixel type "
          "(re-export the stack at one bit depth)"
        )
    channel_dtypes[name] = headers[0][1].name
  y, x = reference[1]
  dtype = _image_dtype(list(channel_dtypes.values()), "--channel")

  label_files: dict[int, SliceFile] = {}
  if labels:
    index_of = {n: z for z, n in enumerate(numbers)}
    found_labels = find_slices(labels, "--labels")
    for f, (shape, _) in zip(found_labels, read_headers(found_labels), strict=True):
      if f.number not in index_of:
        raise IngestError(
          f"--labels: {f.describe()} has slice number {f.number} but no image slice has it "
          f"(image numbers {numbers[0]}..{numbers[-1]})"
        )
      if shape != (y, x):
        raise IngestError(f"--labels: {f.describe()} has shape {shape}, image slices {(y, x)}")
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
    channel_dtypes=channel_dtypes,
  )


def _label_values(data: np.ndarray, f: SliceFile) -> np.ndarray:
  """The distinct values of a label slice; integers only."""
  if not np.issubdtype(data.dtype, np.integer):
    if not np.all(np.equal(np.mod(data, 1), 0)):
      raise IngestError(f"--labels: {f.describe()} holds non-integer values")
  return np.unique(data)


def _convention(unlabelled: int) -> str:
  """How errors name the label convention the user chose."""
  return "" if unlabelled == volume_lib.IGNORE_LABEL else f" with --labels_unlabelled={unlabelled}"


def _first_class(unlabelled: int) -> int:
  """The label value of class 0 in the user's convention: 1 when 0 means not painted."""
  return 1 if unlabelled == 0 else 0


def check_unlabelled(unlabelled: int | None) -> int:
  """The label value meaning "not annotated": 255 (the volume's own) or 0 (napari, ilastik).

  None (not stated) is 255.

  Raises:
    IngestError: any other value, naming --labels_unlabelled.
  """
  if unlabelled is None:
    return volume_lib.IGNORE_LABEL
  if isinstance(unlabelled, bool) or unlabelled not in (0, volume_lib.IGNORE_LABEL):
    raise IngestError(
      f"--labels_unlabelled={unlabelled!r}: must be {volume_lib.IGNORE_LABEL} (255 = not "
      "annotated, classes from 0) or 0 (0 = not painted, classes from 1, as napari and "
      "ilastik write them)"
    )
  return int(unlabelled)


def to_volume_labels(
  data: np.ndarray,
  where: str,
  unlabelled: int = volume_lib.IGNORE_LABEL,
  classes: Sequence[str] | None = None,
  flag: str = "--labels",
) -> np.ndarray:
  """One label slice in the user's convention, as the volume holds it.

  The one reading of label values shared by `fibseg ingest --labels` and `fibseg evaluate
  --truth`: with `unlabelled` 255, class i is i; with 0 (napari, ilastik), 0 is not
  painted and class i is i + 1.

  Args:
    data: [y, x] label values as read from the file.
    where: the file, for messages.
    unlabelled: 255 or 0 (`check_unlabelled`).
    classes: the class names, to check the values against; None checks only the range.
    flag: the flag named in errors.

  Returns:
    [y, x] uint8 class indices 0..K-1, 255 = not annotated.

  Raises:
    IngestError: values that are not integers or not classes, naming `where` and `flag`.
  """
  if not np.issubdtype(data.dtype, np.integer):
    if not np.all(np.equal(np.mod(data, 1), 0)):
      raise IngestError(f"{flag}: {where} holds non-integer values")
  values = np.unique(data)
  first = _first_class(unlabelled)
  top = first + (len(classes) if classes is not None else volume_lib.IGNORE_LABEL - 1) - 1
  wrong = [int(v) for v in values if v != unlabelled and not first <= v <= top]
  if wrong:
    if classes is None:
      raise IngestError(
        f"{flag}: {where} holds label values {wrong[:10]}; class values must be "
        f"{first}..{top} ({unlabelled} = not annotated{_convention(unlabelled)})"
      )
    painted = (
      unlabelled == volume_lib.IGNORE_LABEL
      and 0 in values
      and max(int(v) for v in values) == len(classes)
    )
    hint = (
      f"; values 0..{len(classes)} with {len(classes)} classes are napari-style labels (0 "
      "= not painted, classes from 1): pass --labels_unlabelled=0"
      if painted
      else "; fix the stray values, or name every class in --classes"
    )
    raise IngestError(
      f"{flag}: {where} holds label values {wrong[:10]} but --classes names "
      f"{len(classes)} classes {list(classes)} (valid: {first}..{top}, "
      f"{unlabelled} = not annotated{_convention(unlabelled)}){hint}"
    )
  if unlabelled == volume_lib.IGNORE_LABEL:
    return data.astype(np.uint8)
  # 0 = not painted -> 255; class value v -> v - 1 (values checked to be 1..K above).
  return np.where(data == unlabelled, volume_lib.IGNORE_LABEL, data.astype(np.int64) - 1).astype(
    np.uint8
  )


def _check_labels(
  data: np.ndarray, f: SliceFile, shape: tuple[int, int], classes, unlabelled: int = 255
) -> np.ndarray:
  """Checks a label slice in the user's convention; returns it in the volume's.

  Returns:
    [y, x] uint8 class indices 0..K-1, 255 = not annotated.
  """
  if data.shape != shape:
    raise IngestError(f"--labels: {f.describe()} has shape {data.shape}, image slices {shape}")
  return to_volume_labels(data, f.describe(), unlabelled, classes)


# 0 covering at least this share of every label slice (and no 255 anywhere) looks like
# napari-style painting (0 = not painted): warned about, and refused from _SURE_SHARE on.
PAINTED_SHARE = 0.5
_SURE_SHARE = 0.9


def painted_labels_check(
  plan: IngestPlan, classes: Sequence[str] | None
) -> tuple[str | None, str | None]:
  """Whether the label files look painted with 0 = not painted, read as 255 = not annotated.

  Looked at only when --labels_unlabelled was not stated and no label file holds 255.
  Sure (an error): values 0..K with K classes named, or 0 covering at least 90% of every
  label file. Not sure (a warning): 0 covering at least half of every label file.

  Returns:
    (error, warning), each a message or None.
  """
  if not plan.labels:
    return None, None
  shares, values, least = [], set(), None
  for f in plan.labels.values():
    data = f.read(labels=True)
    found = np.unique(data)
    if volume_lib.IGNORE_LABEL in found:
      return None, None  # 255 is used: the volume's own convention
    values.update(int(v) for v in found)
    share = float(np.count_nonzero(data == 0)) / data.size
    shares.append(share)
    if least is None or share < least[0]:
      least = (share, f)
  if 0 not in values:
    return None, None
  advice = (
    "if 0 means not painted (napari and ilastik label layers), pass --labels_unlabelled=0 "
    "(classes are then the values 1, 2, ...)"
  )
  top = max(values)
  if classes is not None and top == len(classes):
    return (
      f"--labels: the label files hold values 0..{top} and --classes names {len(classes)} "
      f"classes {list(classes)}: napari-style labels (0 = not painted, classes 1..{top}); "
      "pass --labels_unlabelled=0",
      None,
    )
  share, f = least
  what = f"class {classes[0]!r}" if classes else "a class of its own (class0)"
  found = (
    f"value 0 covers {100 * share:.1f}% or more of every label file ({f.describe()} the "
    f"least), and no file holds 255 (not annotated), so every 0 pixel would train as {what}"
  )
  if share >= _SURE_SHARE:
    return (
      f"--labels: {found}; {advice}; if 0 really is a class, pass --labels_unlabelled=255 "
      "to say so",
      None,
    )
  if share >= PAINTED_SHARE:
    return None, f"--labels: {found}; {advice}"
  return None, None


def _infer_classes(plan: IngestPlan, unlabelled: int = 255) -> tuple[str, ...]:
  """Class names class0, class1, ... from the label values, when --classes is not given.

  A stack without --labels is one to segment only: no classes (the model brings them).
  A value above a gap (0..3 and 7) is refused: it is more often a stray pixel than three
  empty classes, and empty classes would train silently. Values are checked and named in
  the user's convention (`unlabelled`); the names count classes from 0 in either.
  """
  if not plan.labels:
    return ()
  first = _first_class(unlabelled)
  top_allowed = first + volume_lib.IGNORE_LABEL - 2  # 254 classes at most
  convention = _convention(unlabelled)
  where: dict[int, SliceFile] = {}  # each value (user's convention) -> first file holding it
  for f in plan.labels.values():
    values = _label_values(f.read(labels=True), f)
    values = values[values != unlabelled]
    wrong = [int(v) for v in values if not first <= v <= top_allowed]
    if wrong:
      raise IngestError(
        f"--labels: {f.describe()} holds label values {wrong[:10]}; class indices must be "
        f"{first}..{top_allowed} ({unlabelled} = not annotated{convention})"
      )
    for v in values:
      where.setdefault(int(v), f)
  if not where:
    raise IngestError(
      f"--labels: the {len(plan.labels)} label file(s) hold no class values (all "
      f"{unlabelled} = not annotated{convention}); label some pixels, or leave out "
      "--labels to ingest a stack for segmentation only"
    )
  top = max(where)
  missing = [v for v in range(first, top + 1) if v not in where]
  if missing:
    above = sorted(v for v in where if v > missing[0])
    files = ", ".join(sorted({where[v].describe() for v in above})[:3])
    raise IngestError(
      f"--labels: values {sorted(where)} are present but {missing[:10]} never occur, so "
      f"{len(missing)} of {top - first + 1} classes would be empty (value(s) {above[:10]} "
      f"first in {files}{convention}); fix the stray values, or pass --classes with one "
      f"name per value {first}..{top} to keep the empty classes"
    )
  return tuple(f"class{i}" for i in range(top - first + 1))


def ingest(
  plan: IngestPlan,
  out: str,
  *,
  voxel_size_nm: Sequence[float],
  overwrite: bool = False,
  progress: bool = True,
  on_slice: Callable[[int], None] | None = None,
  unlabelled: int | None = None,
  warn: Callable[[str], None] | None = None,
) -> volume_lib.VolumeMetadata:
  """Streams the planned slices into a new volume at `out`.

  Writes to a temporary sibling and renames on success: a failure leaves nothing. A
  label slice with no class value (all `unlabelled`) is not written and not counted as
  annotated.

  Args:
    plan: from `plan_ingest`.
    out: volume root (path or kvstore URL).
    voxel_size_nm: (z, y, x).
    overwrite: replace an existing volume.
    progress: show a progress bar.
    on_slice: called with each z after it is queued (tests use it to interrupt).
    unlabelled: the label value meaning "not annotated" in the label files: 255 (classes
      0..K-1) or 0 (classes 1..K, napari's and ilastik's convention). The volume written
      is the same either way (255 = not annotated, classes 0..K-1). None (not stated)
      is 255, after `painted_labels_check`: labels that look painted with 0 = not painted
      are refused (sure) or warned about (not sure).
    warn: called with a warning (default: `logging.warning`).

  Returns:
    The metadata of the written volume (with the slice numbers of its files).

  Raises:
    IngestError: naming the file and the flag, with values in the user's convention.
  """
  stated = unlabelled is not None
  unlabelled = check_unlabelled(unlabelled)
  if not stated:
    error, warning = painted_labels_check(plan, plan.classes or None)
    if error:
      raise IngestError(error)
    if warning:
      (warn or logging.warning)(warning)
  classes = plan.classes or _infer_classes(plan, unlabelled)
  names = list(plan.channels)
  inputs = {f"--channel={n}": [f.path for f in plan.channels[n]] for n in names}
  inputs["--labels"] = [f.path for f in plan.labels.values()]
  try:
    writer = volume_lib.create_volume(
      out,
      shape=plan.shape,
      dtype=plan.dtype,
      channels=names,
      classes=classes,
      voxel_size_nm=voxel_size_nm,
      overwrite=overwrite,
      inputs=inputs,
      flag="--out",
    )
  except volume_lib.VolumeError as e:
    raise IngestError(str(e) if str(e).startswith("--out") else f"--out: {e}") from e
  with writer:
    for z in Bar(range(plan.shape[0]), desc="ingest", unit="slice", disable=not progress):
      planes = []
      for name in names:
        f = plan.channels[name][z]
        data = f.read()
        # The plan read headers; a file that decodes otherwise is refused, not cast.
        if data.shape != plan.shape[1:]:
          raise IngestError(
            f"--channel={name}: {f.describe()} has shape {data.shape}, "
            f"expected {plan.shape[1:]} like the first slice"
          )
        expected = plan.channel_dtypes.get(name, data.dtype.name)
        if data.dtype.name != expected:
          raise IngestError(
            f"--channel={name}: {f.describe()} decodes to {data.dtype.name}, expected "
            f"{expected} like the first slice"
          )
        planes.append(data)
      image = np.stack(planes, axis=-1)
      labels = None
      if z in plan.labels:
        f = plan.labels[z]
        labels = _check_labels(f.read(labels=True), f, plan.shape[1:], classes, unlabelled)
        if np.all(labels == volume_lib.IGNORE_LABEL):
          labels = None  # an unannotated slice, e.g. a page of a label stack
      writer.write_slice(z, image, labels)
      if on_slice is not None:
        on_slice(z)
    meta = writer.commit(
      extra_attrs={
        "slice_numbers": plan.numbers,
        "sources": {n: plan.channels[n][0].path for n in names},
      }
    )
  numbers = volume_lib.SliceNumbers.of(plan.numbers, plan.shape[0]).numbers
  return dataclasses.replace(meta, slice_numbers=numbers)
