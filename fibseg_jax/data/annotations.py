"""Annotation sets drawn from a stack's truth, at a chosen effort: strokes, slices, every Nth.

What a user paints is simulated from full labels, so an annotation-effort curve can be
measured on a stack whose truth is known (`fibseg_jax.study.effort`):

* `strokes`: brush strokes inside each class, as a user paints them in napari or
  ilastik: pieces of the class's skeleton (so they run along the middle of a region,
  never across a boundary), `width` pixels wide, until about `fraction` of the slice is
  painted, shared equally between the classes present;
* `Level`: a named annotation set (`strokes:0.02`, `slices:3`, `every:4`) resolved
  against a stack's training slices and the slices with truth;
* `write_annotated_volume`: the stack with only that set's labels (255 elsewhere), a
  volume `fibseg train` reads like any other.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from scipy import ndimage
from skimage import morphology

from fibseg_jax.data import ome
from fibseg_jax.data import volume as volume_lib

IGNORE_LABEL = volume_lib.IGNORE_LABEL
KINDS = ("strokes", "slices", "every")
# A stroke is the skeleton within this many pixels of a random point on it (about twice
# as long), the length of a quick brush stroke on a screen.
STROKE_RADIUS = 24


def strokes(
  truth: np.ndarray, fraction: float, *, seed: int | Sequence[int], width: int = 3
) -> np.ndarray:
  """Brush strokes over `fraction` of a slice, drawn from its truth.

  Args:
    truth: [y, x] labels; 255 = unknown (never painted).
    fraction: share of the slice's pixels to paint (0 < fraction <= 1), split equally
      between the classes present; a class too small for its share gets what its
      skeleton allows.
    seed: random seed (an int or a sequence, as numpy's `default_rng`).
    width: brush width in pixels (odd sizes are exact).

  Returns:
    [y, x] uint8: the painted classes, 255 elsewhere. Every painted pixel carries its
    true class.
  """
  truth = np.asarray(truth)
  if truth.ndim != 2:
    raise ValueError(f"strokes need one slice [y, x], got shape {truth.shape}")
  if not 0 < fraction <= 1:
    raise ValueError(f"stroke fraction must lie in (0, 1], got {fraction}")
  if width < 1:
    raise ValueError(f"brush width must be >= 1 pixel, got {width}")
  rng = np.random.default_rng(seed)
  present = [int(c) for c in np.unique(truth) if c != IGNORE_LABEL]
  out = np.full(truth.shape, IGNORE_LABEL, np.uint8)
  if not present:
    return out
  share = fraction * truth.size / len(present)
  brush = morphology.disk(width // 2) if width > 1 else np.ones((1, 1), bool)
  r, h = STROKE_RADIUS, width // 2
  for c in present:
    mask = truth == c
    # Strokes run inside the class: along the skeleton of the region shrunk by the
    # brush, or of the region itself where it is thinner than the brush.
    inner = ndimage.binary_erosion(mask, brush) if width > 1 else mask
    skeleton = morphology.skeletonize(inner if inner.any() else mask)
    parts, _ = ndimage.label(skeleton, structure=np.ones((3, 3), bool))
    painted = np.zeros(truth.shape, bool)
    count = 0
    for y, x in rng.permutation(np.argwhere(skeleton)):
      if count >= share:
        break
      if painted[y, x]:
        continue
      y0, x0 = max(y - r - h, 0), max(x - r - h, 0)
      y1, x1 = min(y + r + h + 1, truth.shape[0]), min(x + r + h + 1, truth.shape[1])
      window = parts[y0:y1, x0:x1] == parts[y, x]
      # The last stroke of a class is shortened to what its share has left (a stroke of
      # radius rho covers about 2 rho x width pixels).
      rho = min(r, max(1, int((share - count) / (2 * width))))
      gy, gx = np.ogrid[: y1 - y0, : x1 - x0]
      near = (gy - (y - y0)) ** 2 + (gx - (x - x0)) ** 2 <= rho**2
      stroke = ndimage.binary_dilation(window & near, brush) & mask[y0:y1, x0:x1]
      new = stroke & ~painted[y0:y1, x0:x1]
      painted[y0:y1, x0:x1] |= new
      count += int(new.sum())
    out[painted] = c
  return out


@dataclasses.dataclass(frozen=True)
class Level:
  """One annotation effort: `kind:value`.

  Attributes:
    kind: "strokes" (strokes over `value` of each training slice), "slices" (`value`
      whole slices) or "every" (every `value`-th slice with truth, whole).
    value: the fraction (strokes) or the count / step (slices, every).
  """

  kind: str
  value: float

  @classmethod
  def parse(cls, text: str, flag: str = "--levels") -> Level:
    """`strokes:0.02`, `slices:3` or `every:4`; errors name `flag`."""
    kind, _, value = str(text).partition(":")
    try:
      number = float(value)
    except ValueError:
      number = float("nan")
    whole = kind in ("slices", "every")
    if (
      kind not in KINDS
      or not np.isfinite(number)
      or (whole and (number < 1 or number != int(number)))
      or (not whole and not 0 < number <= 1)
    ):
      raise ValueError(
        f"{flag}: {text!r} is not an annotation level; expected strokes:F (0 < F <= 1, the "
        "painted share of each training slice), slices:N or every:N (N >= 1 whole)"
      )
    return cls(kind, int(number) if whole else number)

  @property
  def name(self) -> str:
    return f"{self.kind}:{self.value:g}"

  def slices(self, train_slices: Sequence[int], candidates: Sequence[int]) -> list[int]:
    """The slices this level annotates.

    Args:
      train_slices: the stack's training slices (strokes are painted on them; `slices:N`
        takes N of them, evenly spread, while N fits).
      candidates: every slice whose truth may be used (not the evaluation slices).
    """
    train, pool = sorted(int(z) for z in train_slices), sorted(int(z) for z in candidates)
    if self.kind == "strokes":
      return train
    if self.kind == "every":
      n = int(self.value)
      return pool[n // 2 :: n] or pool[:1]
    n = int(self.value)
    source = train if n <= len(train) else pool
    if n > len(source):
      raise ValueError(f"slices:{n}: only {len(source)} slices with truth to choose from")
    # Evenly spread: the middle of n equal parts of the list.
    return [source[int(round((i + 0.5) * len(source) / n - 0.5))] for i in range(n)]

  def labels(self, truth: np.ndarray, z: int, seed: int) -> np.ndarray:
    """This level's labels of slice `z` whose truth is `truth` [y, x]."""
    if self.kind == "strokes":
      return strokes(truth, float(self.value), seed=[int(seed), int(z)])
    return np.asarray(truth, np.uint8)


def write_annotated_volume(
  truth: volume_lib.Volume,
  root: str,
  labels: Mapping[int, np.ndarray],
  *,
  extra_attrs: Mapping[str, Any] | None = None,
  overwrite: bool = False,
) -> volume_lib.VolumeMetadata:
  """Writes `truth`'s image with only `labels` ({z: [y, x]}) as its annotation.

  The channel statistics are recomputed from the same image, so normalisation matches.
  """
  meta = truth.metadata
  with volume_lib.create_volume(
    root,
    shape=truth.shape,
    dtype=meta.dtype,
    channels=truth.channels,
    classes=truth.classes,
    voxel_size_nm=meta.voxel_size_nm,
    overwrite=overwrite,
    ome_view=False,
  ) as writer:
    for z in range(truth.shape[0]):
      writer.write_slice(z, truth.read_image(z), labels.get(z))
    return writer.commit(extra_attrs=dict(extra_attrs or {}))


def painted_from_volume(volume: volume_lib.Volume) -> np.ndarray:
  """The volume's hand labels as painting tools hold them: [z, y, x] uint8, 0 = not
  painted, class i painted as i + 1 (napari's and ilastik's Labels convention)."""
  painted = np.zeros(volume.shape, np.uint8)
  for z in volume.metadata.annotated_slices:
    painted[z] = ome.label_values(volume.read_labels(z), IGNORE_LABEL)
  return painted


def labels_from_painted(
  painted: np.ndarray, num_classes: int, where: str = "painted"
) -> np.ndarray:
  """Painted values (0 = not painted, i + 1 = class i) -> library labels (255 = none).

  Raises:
    volume_lib.VolumeError: a value above `num_classes`, naming it.
  """
  painted = np.asarray(painted)
  if painted.size and int(painted.max()) > num_classes:
    raise volume_lib.VolumeError(
      f"{where}: label value {int(painted.max())} is painted, but there are {num_classes} "
      f"classes (values 1..{num_classes}; 0 = not painted)"
    )
  labels = painted.astype(np.int32) - 1
  labels[painted == 0] = IGNORE_LABEL
  return labels.astype(np.uint8)


def save_painted(root: Any, painted: np.ndarray) -> list[int]:
  """Writes a painted [z, y, x] stack (0 = not painted) into the volume's labels.

  Only slices whose labels differ from the stored ones are written (`write_labels`,
  crash-safe); a slice painted over entirely with 0 stops being annotated.

  Returns:
    The slices written.

  Raises:
    volume_lib.VolumeError: another shape than the volume's, or a value above the classes.
  """
  vol = volume_lib.open_volume(root, check_labels=False)
  painted = np.asarray(painted)
  if painted.shape != tuple(vol.shape):
    raise volume_lib.VolumeError(
      f"{volume_lib.describe(root)}: the painted labels are {list(painted.shape)} [z, y, x]; "
      f"the volume is {list(vol.shape)}"
    )
  annotated = set(vol.metadata.annotated_slices)
  touched = painted.reshape(painted.shape[0], -1).any(axis=1)
  changed = {}
  for z in range(painted.shape[0]):
    if not touched[z] and z not in annotated:
      continue
    labels = labels_from_painted(painted[z], vol.metadata.num_classes, f"slice {z}")
    stored = vol.read_labels(z) if z in annotated else None
    if stored is None or not np.array_equal(stored, labels):
      changed[z] = labels
  volume_lib.write_labels(root, changed)
  return sorted(changed)
