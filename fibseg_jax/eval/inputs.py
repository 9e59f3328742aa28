"""The inputs of an evaluation: the prediction, the truth and the image shown.

  prediction = open_prediction("seg.zarr")          # `fibseg segment`'s labels output
  truth = open_truth("vol.zarr")                    # or a glob of label images
  image = open_image(truth, prediction, None)        # what the figures show, or None

The prediction is a zarr v3 label array [z, y, x] uint8 as `fibseg segment` writes it (its
attributes name the classes and the source volume; opened by `infer.store`); any zarr
v3 uint8 array works, with class names taken from the truth. The truth is a volume (its
labels on the chosen slices, by default its annotated slices) or a glob of label images
(TIFF/PNG, one per slice, slice number = last integer in the file name), read in the
same conventions as `fibseg ingest --labels` (`ingest.to_volume_labels`): 255 = not
annotated and classes from 0, or with `unlabelled=0` (--labels_unlabelled=0) 0 = not
painted and classes from 1, as napari and ilastik write them.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from fibseg_jax.data import ingest
from fibseg_jax.data import volume as volume_lib
from fibseg_jax.infer import store

NOT_SEGMENTED = volume_lib.IGNORE_LABEL


class EvaluationError(ValueError):
  """Inputs of an evaluation that do not fit together; the message names the flag."""


# An opened label array: path, array (tensorstore [z, y, x] uint8), classes (from the
# attributes, or ()), source (the volume it was segmented from, or None), run (the run
# record `fibseg segment` stored, or {}) and shape.
Prediction = store.Segmentation


def open_prediction(path: Any) -> Prediction:
  """Opens a label array written by `fibseg segment` (or any zarr v3 [z, y, x] uint8 array).

  Raises:
    EvaluationError: no array there, or not [z, y, x] uint8.
  """
  where = volume_lib.describe(path)
  try:
    pred = store.open_segmentation(path)
  except store.NotAnArray as e:
    messages = {
      "missing": f"--prediction={where}: no such array (run `fibseg segment` first)",
      "no_metadata": f"--prediction={where}: not a zarr v3 array (no zarr.json)",
      "not_array": f"--prediction={where} is a zarr {e.node_type}, not a label array; pass "
      "the --output of `fibseg segment`",
    }
    raise EvaluationError(messages.get(e.reason, f"--prediction={e}")) from e
  except store.OutputError as e:
    raise EvaluationError(f"--prediction={e}") from e
  array = pred.array
  if array.rank != 3 or array.dtype.name != "uint8":
    raise EvaluationError(
      f"--prediction={where}: expected labels [z, y, x] uint8, got {array.dtype.name} "
      f"{list(array.shape)}"
    )
  return pred


@dataclasses.dataclass(frozen=True)
class Truth:
  """Hand labels for some slices.

  Attributes:
    description: for messages and the report.
    shape: (z, y, x) of the labelled stack, z None for a glob.
    slices: slice indices that have labels.
    classes: class names, or () when unknown (a glob).
    read: z -> [y, x] uint8 labels, 255 = not annotated.
    volume: the volume when the truth is one (its images go into the figures).
  """

  description: str
  shape: tuple[int | None, int, int]
  slices: tuple[int, ...]
  classes: tuple[str, ...]
  read: Callable[[int], np.ndarray]
  volume: volume_lib.Volume | None = None


def _is_glob(spec: str) -> bool:
  return any(ch in spec for ch in "*?[") or spec.lower().endswith(ingest.IMAGE_EXTENSIONS)


def open_truth(
  spec: str | os.PathLike,
  slice_numbers: Sequence[int] | None = None,
  unlabelled: int | None = None,
) -> Truth:
  """Opens the truth: a volume root, or a glob of label images.

  Args:
    spec: volume root or glob.
    slice_numbers: for a glob, the instrument slice number of each z (ingest stores them
      in the volume as `slice_numbers`), so `labels_0001.tif` lands on the z that ingest
      gave image slice 1; default: the number in the file name is z.
    unlabelled: for a glob, the label value meaning "not annotated": 255 (default) or 0
      (napari, ilastik: classes from 1), as `fibseg ingest --labels_unlabelled`. A volume
      has its own convention; giving one with it is refused.

  Raises:
    EvaluationError: naming --truth and what is wrong.
  """
  spec = os.fspath(spec)
  try:
    convention = ingest.check_unlabelled(unlabelled)
  except ingest.IngestError as e:
    raise EvaluationError(str(e)) from None
  if _is_glob(spec):
    try:
      files = {f.number: f for f in ingest.find_slices(spec, "--truth")}
      first = files[min(files)].read(labels=True)
    except ingest.IngestError as e:
      raise EvaluationError(str(e)) from e
    if slice_numbers is not None:
      z_of = {int(n): z for z, n in enumerate(slice_numbers)}
      unknown = sorted(set(files) - set(z_of))
      if unknown:
        raise EvaluationError(
          f"--truth: {files[unknown[0]].describe()} has slice number {unknown[0]}, which no "
          f"image slice of the segmented volume has ({slice_numbers[0]}..{slice_numbers[-1]})"
        )
      files = {z_of[n]: f for n, f in files.items()}

    def read(z: int) -> np.ndarray:
      f = files[z]
      try:
        data = f.read(labels=True)
      except ingest.IngestError as e:
        raise EvaluationError(str(e)) from e
      if data.shape != first.shape:
        raise EvaluationError(
          f"--truth: {f.describe()} is {data.shape}, but {files[min(files)].describe()} is "
          f"{first.shape}"
        )
      if data.min() < 0 or data.max() > 255:
        raise EvaluationError(f"--truth: {f.describe()} holds values outside 0..255")
      try:
        return ingest.to_volume_labels(data, f.describe(), convention, flag="--truth")
      except ingest.IngestError as e:
        raise EvaluationError(str(e)) from None

    return Truth(
      description=spec,
      shape=(None, *first.shape),
      slices=tuple(sorted(files)),
      classes=(),
      read=read,
    )
  if unlabelled is not None and convention != volume_lib.IGNORE_LABEL:
    raise EvaluationError(
      f"--labels_unlabelled={unlabelled}: --truth {spec} is a volume, whose labels are "
      "already in its own convention; give it only with a glob of label images"
    )
  try:
    vol = volume_lib.open_volume(spec, check_labels=False)
  except volume_lib.VolumeError as e:
    raise EvaluationError(
      f"--truth: {e} (or give a glob of label images, e.g. 'labels/*.tif')"
    ) from e
  return Truth(
    description=volume_lib.describe(spec),
    shape=vol.shape,
    slices=tuple(vol.metadata.annotated_slices),
    classes=vol.classes,
    read=lambda z: vol.read_labels(z),
    volume=vol,
  )


def open_image(truth: Truth, prediction: Prediction, image: Any | None) -> volume_lib.Volume | None:
  """The volume whose channels the figures show: `image` (--image) when given, else the
  truth volume, else the prediction's source volume when it is still there and fits.

  Raises:
    EvaluationError: --image cannot be opened or differs from the prediction in shape.
  """
  if image is not None:
    try:
      vol = volume_lib.open_volume(image, check_labels=False)
    except volume_lib.VolumeError as e:
      raise EvaluationError(f"--image: {e}") from e
    if vol.shape != prediction.shape:
      raise EvaluationError(
        f"--image {volume_lib.describe(image)} is {list(vol.shape)} [z, y, x] but "
        f"--prediction is {list(prediction.shape)}"
      )
    return vol
  if truth.volume is not None:
    return truth.volume
  if prediction.source:
    try:
      vol = volume_lib.open_volume(prediction.source, check_labels=False)
    except volume_lib.VolumeError:
      return None  # moved or deleted: the figures then show labels only
    return vol if vol.shape == prediction.shape else None
  return None


def truth_slice_numbers(truth: Any, prediction: Prediction) -> list[int] | None:
  """The instrument slice numbers of the prediction's source volume, for a label glob."""
  if not _is_glob(os.fspath(truth)) or not prediction.source:
    return None
  try:
    numbers = volume_lib.group_attributes(prediction.source).get("slice_numbers")
  except volume_lib.VolumeError:
    return None  # moved or deleted: fall back to file number = z
  return [int(n) for n in numbers] if numbers else None
