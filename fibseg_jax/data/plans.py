"""Patch plans: where the patches of a batch come from and how they are augmented.

Pure numpy, no reading: global training batch k is a pure function of (seed, k), so the
loader's position is the step number, and every process computes the whole global plan
(cheap) and reads only its rows. Patch centres are drawn so that every patch holds
training pixels: a sampling cell of the `split.Split` is drawn with probability
proportional to its number of training pixels, then the patch is placed uniformly among
the positions that contain the whole cell. Unlabelled patches come from their own random
stream, so turning semi-supervised training on or off leaves the labelled ones unchanged.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

from fibseg_jax.data import augment, split

if TYPE_CHECKING:
  from fibseg_jax.data.loader_config import LoaderConfig

# Random streams of (seed, stream, step); split.SPLIT_STREAM is 0.
TRAIN_STREAM = 1
UNLABELLED_STREAM = 2
OWN_ALL = 2**62  # an `own` bound past any volume: the patch keeps all it reads


@dataclasses.dataclass(frozen=True)
class PatchPlan:
  """Where the patches of a batch come from and how they are augmented.

  Attributes (all with a leading [n] patch axis):
    z: central slice; -1 marks a padding entry (zero image, all-255 labels).
    y0, x0: top-left corner of the patch in the volume.
    own: [n, 4] (y0, y1, x0, x1) volume region whose labels the patch keeps; labels
      outside it read 255 (validation tiles own exactly their share of a block;
      training patches own everything, `OWN_ALL`).
    flip_y, flip_x, reverse: bool flips of y, x and the slice order.
    rot90: number of counter-clockwise quarter turns in y-x, 0..3.
    gain, offset, gamma: [n, channels] intensity jitter.
    angle, scale, elastic: [n] the resampling warp (0, 1, 0: none; `augment.Warp`).
    drift: [n, slices, 2] in-plane shift of each slice of the slab (0 for the centre).
    field_seed: [n] seed of the patch's random fields (elastic, stripes, noise).
    invert, contrast, noise, blur, lowres, curtain, shading, charging: [n, channels]
      the rest of the patch's `augment.Jitter`.
  """

  z: np.ndarray
  y0: np.ndarray
  x0: np.ndarray
  own: np.ndarray
  flip_y: np.ndarray
  flip_x: np.ndarray
  rot90: np.ndarray
  reverse: np.ndarray
  gain: np.ndarray
  offset: np.ndarray
  gamma: np.ndarray
  angle: np.ndarray
  scale: np.ndarray
  elastic: np.ndarray
  drift: np.ndarray
  field_seed: np.ndarray
  invert: np.ndarray
  contrast: np.ndarray
  noise: np.ndarray
  blur: np.ndarray
  lowres: np.ndarray
  curtain: np.ndarray
  shading: np.ndarray
  charging: np.ndarray

  def __len__(self) -> int:
    return len(self.z)

  def rows(self, start: int, stop: int) -> PatchPlan:
    """The plan of patches start..stop-1 (one process's share)."""
    return PatchPlan(
      **{f.name: getattr(self, f.name)[start:stop] for f in dataclasses.fields(self)}
    )

  def symmetry(self, i: int) -> augment.Symmetry:
    """The slab reversal, flips and quarter turns of patch i."""
    return augment.Symmetry(
      reverse=bool(self.reverse[i]),
      flip_y=bool(self.flip_y[i]),
      flip_x=bool(self.flip_x[i]),
      turns=int(self.rot90[i]),
    )

  def warp(self, i: int) -> augment.Warp:
    """The resampling of patch i."""
    return augment.Warp(
      angle=float(self.angle[i]),
      scale=float(self.scale[i]),
      elastic=float(self.elastic[i]),
      drift=self.drift[i],
      field_seed=int(self.field_seed[i]),
    )

  def jitter(self, i: int) -> augment.Jitter:
    """The intensity augmentation of patch i."""
    return augment.Jitter(*(getattr(self, name)[i] for name in augment.Jitter._fields))

  @classmethod
  def identity(
    cls,
    z: np.ndarray,
    y0: np.ndarray,
    x0: np.ndarray,
    own: np.ndarray,
    channels: int,
    slices: int = 1,
  ) -> PatchPlan:
    """A plan without augmentation."""
    n = len(z)
    false = np.zeros(n, bool)
    none = augment.Jitter.none(channels)
    return cls(
      z=z,
      y0=y0,
      x0=x0,
      own=own,
      flip_y=false,
      flip_x=false,
      rot90=np.zeros(n, np.int64),
      reverse=false,
      gain=np.ones((n, channels), np.float32),
      offset=np.zeros((n, channels), np.float32),
      gamma=np.ones((n, channels), np.float32),
      angle=np.zeros(n, np.float32),
      scale=np.ones(n, np.float32),
      elastic=np.zeros(n, np.float32),
      drift=np.zeros((n, slices, 2), np.float32),
      field_seed=np.zeros(n, np.uint64),
      **{
        name: np.repeat(getattr(none, name)[None], n, axis=0)
        for name in (
          "invert",
          "contrast",
          "noise",
          "blur",
          "lowres",
          "curtain",
          "shading",
          "charging",
        )
      },
    )


def train_plan(
  config: LoaderConfig, cells: split.Split, shape: Sequence[int], step: int
) -> PatchPlan:
  """The global plan of training batch `step`: a pure function of (seed, step).

  Args:
    config: the loader settings (seed, batch size, patch, augmentation).
    cells: the split, whose training cells the patches are drawn over.
    shape: (z, y, x) of the volume.
    step: the global step.
  """
  n, c, patch = config.batch_size, len(config.channels), config.patch
  _, height, width = shape
  rng = np.random.default_rng([config.seed, TRAIN_STREAM, int(step)])
  pick = np.searchsorted(cells.cell_cumsum, rng.random(n) * cells.cell_cumsum[-1], "right")
  rare = int(round(config.rare_fraction * n))
  if rare:
    pick[n - rare :] = rare_cells(
      cells, rare, np.random.default_rng([config.seed, TRAIN_STREAM, int(step), 2])
    )
  s, cy, cx = np.unravel_index(cells.cells[pick], cells.cells_shape)
  # Any placement that contains the whole cell, clipped to the volume.
  y0 = rng.integers(
    np.maximum(0, cells.cell_y[cy + 1] - patch), np.minimum(cells.cell_y[cy], height - patch) + 1
  )
  x0 = rng.integers(
    np.maximum(0, cells.cell_x[cx + 1] - patch), np.minimum(cells.cell_x[cx], width - patch) + 1
  )
  extra = np.random.default_rng([config.seed, TRAIN_STREAM, int(step), 1])
  return _augmented(config, rng, extra, np.asarray(cells.train_slices)[s], y0, x0, c)


def rare_cells(cells: split.Split, n: int, rng: np.random.Generator) -> np.ndarray:
  """Indices into `cells.cells` of n cells drawn class-balanced.

  Each draw picks a class uniformly among those with training pixels, then a cell with
  probability proportional to its pixels of that class, so a class holding 1% of the
  training area is in as many of these patches as one holding 90%.
  """
  counts = cells.cell_class_counts  # [cells, classes]
  present = np.flatnonzero(counts.sum(0))
  classes = present[rng.integers(0, len(present), n)]
  cumsum = np.cumsum(counts[:, classes], axis=0)  # [cells, n]
  return np.array(
    [np.searchsorted(cumsum[:, j], rng.random() * cumsum[-1, j], "right") for j in range(n)],
    np.int64,
  )


def unlabelled_plan(config: LoaderConfig, shape: Sequence[int], step: int) -> PatchPlan:
  """The global plan of the unlabelled patches of batch `step`: any slice, any place.

  A pure function of (seed, step), on its own random stream.
  """
  n = config.unlabelled_batch
  depth, height, width = shape
  rng = np.random.default_rng([config.seed, UNLABELLED_STREAM, int(step)])
  z = rng.integers(0, depth, n)
  y0 = rng.integers(0, height - config.patch + 1, n)
  x0 = rng.integers(0, width - config.patch + 1, n)
  extra = np.random.default_rng([config.seed, UNLABELLED_STREAM, int(step), 1])
  return _augmented(config, rng, extra, z, y0, x0, len(config.channels))


def _augmented(
  config: LoaderConfig,
  rng: np.random.Generator,
  extra: np.random.Generator,
  z: np.ndarray,
  y0: np.ndarray,
  x0: np.ndarray,
  c: int,
) -> PatchPlan:
  """A plan of whole patches at (z, y0, x0) with augmentation drawn from rng (the
  symmetries and jitter of the first recipe) and `extra` (the rest), each a stream of its
  own so switching a part of the recipe on leaves the draws of the others as they were."""
  n = len(z)
  # Drawn whatever the switches say, so the stream (and the patches) do not depend on them.
  flip_y, flip_x, reverse = rng.random((3, n)) < 0.5
  rot90 = rng.integers(0, 4, n)
  gain = 1 + rng.uniform(-1, 1, (n, c)) * config.gain
  offset = rng.uniform(-1, 1, (n, c)) * config.offset
  gamma = 1 + rng.uniform(-1, 1, (n, c)) * config.gamma
  on = config.augment
  return PatchPlan(
    z=z,
    y0=y0,
    x0=x0,
    # Whole patches keep every label they read, a warped one's corners too.
    own=np.tile(np.array([0, OWN_ALL, 0, OWN_ALL], np.int64), (n, 1)),
    flip_y=flip_y & (on and config.flips),
    flip_x=flip_x & (on and config.flips),
    rot90=rot90 * (on and config.rot90),
    reverse=reverse & (on and config.reverse_slab),
    gain=(gain if on else np.ones_like(gain)).astype(np.float32),
    offset=(offset if on else np.zeros_like(offset)).astype(np.float32),
    gamma=(gamma if on else np.ones_like(gamma)).astype(np.float32),
    **_recipe(config, extra, n, c),
  )


def _recipe(
  config: LoaderConfig, rng: np.random.Generator, n: int, c: int
) -> dict[str, np.ndarray]:
  """The warp, artifact and degradation fields of a plan: each drawn whatever the
  switches say, then applied with its probability where its magnitude is above 0."""
  s, on = config.slices, config.augment

  def chosen(p: float, shape: tuple[int, ...], magnitude: float) -> np.ndarray:
    hit = rng.random(shape) < p
    return hit & (on and magnitude > 0)

  spatial, intensity, artifact = config.spatial_p, config.intensity_p, config.artifact_p
  angle = rng.uniform(-1, 1, n) * np.deg2rad(config.rotation)
  scale = np.exp2(rng.uniform(-1, 1, n) * config.scale)
  steps = rng.uniform(-1, 1, (n, s, 2)) * config.drift
  field_seed = rng.integers(0, 2**63, n, dtype=np.uint64)
  contrast = 1 + rng.uniform(-1, 1, (n, c)) * config.contrast
  noise = rng.uniform(0, 1, (n, c)) * config.noise
  blur = rng.uniform(0.5, 1, (n, c)) * config.blur
  lowres = 1 - rng.uniform(0, 1, (n, c)) * config.lowres
  curtain = rng.uniform(0.25, 1, (n, c)) * config.curtain
  shading = rng.uniform(0.25, 1, (n, c)) * config.shading
  charging = rng.uniform(0.25, 1, (n, c)) * config.charging
  invert = rng.random((n, c)) < config.invert_gamma
  # Drift: a random walk from the central slice outwards (slices milled one by one).
  h = s // 2
  drift = np.zeros((n, s, 2))
  drift[:, h + 1 :] = np.cumsum(steps[:, h + 1 :], axis=1)
  drift[:, :h] = np.cumsum(steps[:, :h][:, ::-1], axis=1)[:, ::-1]
  drifting = chosen(artifact, (n,), config.drift)

  def where(hit: np.ndarray, value: np.ndarray, none: float) -> np.ndarray:
    return np.where(hit, value, none).astype(np.float32)

  return {
    "angle": where(chosen(spatial, (n,), config.rotation), angle, 0),
    "scale": where(chosen(spatial, (n,), config.scale), scale, 1),
    "elastic": where(chosen(spatial, (n,), config.elastic), np.full(n, config.elastic), 0),
    "drift": where(drifting[:, None, None], drift, 0),
    "field_seed": field_seed,
    "invert": invert & (on and config.gamma > 0),
    "contrast": where(chosen(intensity, (n, c), config.contrast), contrast, 1),
    "noise": where(chosen(intensity, (n, c), config.noise), noise, 0),
    "blur": where(chosen(intensity, (n, c), config.blur), blur, 0),
    "lowres": where(chosen(intensity, (n, c), config.lowres), lowres, 1),
    "curtain": where(chosen(artifact, (n, c), config.curtain), curtain, 0),
    "shading": where(chosen(artifact, (n, c), config.shading), shading, 0),
    "charging": where(chosen(artifact, (n, c), config.charging), charging, 0),
  }


def validation_plan(
  blocks: Sequence[tuple[int, int, int, int, int]],
  shape: Sequence[int],
  patch: int,
  batch_size: int,
  channels: int,
) -> PatchPlan:
  """The tiling of the validation blocks, padded to whole global batches.

  Each block is cut into the fewest equal tiles no larger than `patch`; each tile is
  read through a patch centred on it (clipped to the volume), so the model sees real
  context around it, and owns exactly its tile's labels. Every validation pixel is
  therefore labelled exactly once over the plan.

  Args:
    blocks: (z, y0, y1, x0, x1) of each block, `Split.validation_blocks()`.
    shape: (z, y, x) of the volume.
    patch: the patch side.
    batch_size: the global batch size the plan is padded to.
    channels: number of channels (of the identity jitter).
  """
  _, height, width = shape
  z, y0, x0, own = [], [], [], []

  def tiles(lo: int, hi: int, size: int) -> list[tuple[int, int, int]]:
    parts = math.ceil((hi - lo) / patch)
    cuts = lo + (np.arange(parts + 1) * (hi - lo)) // parts
    out = []
    for a, b in itertools.pairwise(cuts.tolist()):
      start = min(max(0, (a + b - patch) // 2), size - patch)
      out.append((start, a, b))
    return out

  for bz, by0, by1, bx0, bx1 in blocks:
    for ys, ya, yb in tiles(by0, by1, height):
      for xs, xa, xb in tiles(bx0, bx1, width):
        z.append(bz)
        y0.append(ys)
        x0.append(xs)
        own.append((ya, yb, xa, xb))
  pad = -len(z) % batch_size
  z = np.asarray(z + [-1] * pad, np.int64)
  y0 = np.asarray(y0 + [0] * pad, np.int64)
  x0 = np.asarray(x0 + [0] * pad, np.int64)
  own = np.asarray(own + [(0, 0, 0, 0)] * pad, np.int64).reshape(-1, 4)
  return PatchPlan.identity(z, y0, x0, own, channels)
