"""Strokes to a whole-slice segmentation with no training: the forest, then the prior.

The shipped prior (`fibseg_jax/prior/`, made by `fibseg pretrain`) is an enhancer
(`fibseg_jax.models.enhancer`) trained once on domain-randomised FIB-SEM draws to turn a
random forest's class probabilities, plus the image, into the truth. For a user's stack:

  prior = enhance.load_prior()            # the shipped weights, checksum verified
  result = enhance.preview(volume, ("ICE", "TLD"), slices=[20], prior=prior)
  result.labels[20]                       # [y, x] uint8, the enhanced segmentation
  result.forest_labels[20]                # the forest's own, for comparison

The forest is fitted on the labelled pixels of the volume's annotated slices (brush
strokes or whole slices, 255 = not painted), exactly as `fibseg`'s forest route; only
the slices named are predicted, and no label of a predicted slice is read unless that
slice is itself annotated and not left out with `exclude`.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from fibseg_jax import baselines
from fibseg_jax.data import volume as volume_lib
from fibseg_jax.train import from_prior

# The prior's files and their checks live with the training side, which also starts U-Net
# runs from the prior (`fibseg_jax.train.from_prior`).
PRIOR_DIR = from_prior.PRIOR_DIR
WEIGHTS = from_prior.WEIGHTS
PROVENANCE = from_prior.PROVENANCE
PriorError = from_prior.PriorError
# Slices are enhanced in tiles of this side (plus the halo) to bound memory.
TILE = 1024
HALO = 32


@dataclasses.dataclass(frozen=True)
class Prior:
  """Loaded prior: the module, its variables and its provenance record."""

  model: Any
  variables: Any
  provenance: dict[str, Any]
  apply: Any  # jitted (variables, image, probs) -> probabilities

  @property
  def size_multiple(self) -> int:
    return 2 ** int(self.provenance["model"]["depth"])


def load_prior(directory: str = PRIOR_DIR) -> Prior:
  """Loads the prior in `directory` (default: the one shipped in the package).

  Raises:
    PriorError: a missing file, or weights whose sha256 differs from prior.json's.
  """
  import jax  # noqa: PLC0415

  model, variables, provenance = from_prior.read_prior(directory)

  @jax.jit
  def apply(variables, image, probs):
    return jax.nn.softmax(model.apply(variables, image, probs, train=False))

  return Prior(model=model, variables=variables, provenance=provenance, apply=apply)


def enhance(prior: Prior, image: np.ndarray, probabilities: np.ndarray) -> np.ndarray:
  """The prior's class probabilities of one slice.

  Args:
    prior: from `load_prior`.
    image: [y, x, channels] normalised as the forest route normalises (1-3 channels).
    probabilities: [y, x, classes] the forest's.

  Returns:
    float32 [y, x, classes].
  """
  image = np.asarray(image, np.float32)
  probabilities = np.asarray(probabilities, np.float32)
  if image.ndim == 2:
    image = image[..., None]
  ny, nx = image.shape[:2]
  if probabilities.shape[:2] != (ny, nx):
    raise ValueError(
      f"enhance: image {list(image.shape)} and probabilities {list(probabilities.shape)} "
      "differ in y, x"
    )
  m = prior.size_multiple
  out = np.zeros(probabilities.shape, np.float32)
  for y0 in range(0, ny, TILE):
    for x0 in range(0, nx, TILE):
      y1, x1 = min(y0 + TILE, ny), min(x0 + TILE, nx)
      ry0, rx0 = max(y0 - HALO, 0), max(x0 - HALO, 0)
      ry1, rx1 = min(y1 + HALO, ny), min(x1 + HALO, nx)
      # Pad the tile to the network's multiple by reflection.
      py, px = -(ry1 - ry0) % m, -(rx1 - rx0) % m
      pad = ((0, py), (0, px), (0, 0))
      tile_image = np.pad(image[ry0:ry1, rx0:rx1], pad, mode="reflect")
      tile_probs = np.pad(probabilities[ry0:ry1, rx0:rx1], pad, mode="reflect")
      p = np.asarray(prior.apply(prior.variables, tile_image[None], tile_probs[None]))[0]
      out[y0:y1, x0:x1] = p[y0 - ry0 : y1 - ry0, x0 - rx0 : x1 - rx0]
  return out


@dataclasses.dataclass(frozen=True)
class Preview:
  """What `preview` returns.

  Attributes:
    labels: {z: [y, x] uint8} the prior's segmentation of each slice asked for.
    forest_labels: {z: [y, x] uint8} the forest's own.
    probabilities: {z: [y, x, classes] float32} the prior's.
    seconds: {"fit", "forest", "enhance"} wall times.
    training_slices: the annotated slices the forest was fitted on.
  """

  labels: dict[int, np.ndarray]
  forest_labels: dict[int, np.ndarray]
  probabilities: dict[int, np.ndarray]
  seconds: dict[str, float]
  training_slices: tuple[int, ...]


def fit_forest(
  images: Sequence[np.ndarray],
  painted: Sequence[np.ndarray],
  num_classes: int,
  *,
  seed: int = 0,
  forest: baselines.ForestConfig | None = None,
) -> tuple[Any, float]:
  """The fit step of `from_painted`: the forest route fitted on painted slices.

  Args:
    images: raw painted slices [y, x, C].
    painted: their labels [y, x] uint8, 255 = not painted.
    num_classes: classes of the stack.
    seed: the forest's seed.
    forest: its settings (default `ForestConfig()`, the forest route's).

  Returns:
    (the fitted route, with `probabilities` and `normalised`; its fit's wall seconds).
  """
  route = baselines.make_route("forest", num_classes, seed=seed, forest=forest)
  start = time.perf_counter()
  route.fit(list(images), list(painted))
  return route, time.perf_counter() - start


def from_painted(
  images: Sequence[np.ndarray],
  painted: Sequence[np.ndarray],
  targets: dict[int, np.ndarray],
  num_classes: int,
  *,
  prior: Prior | None = None,
  seed: int = 0,
  forest: baselines.ForestConfig | None = None,
) -> Preview:
  """Fits a forest on painted slices and segments `targets` with it and with the prior.

  Args:
    images: raw painted slices [y, x, C].
    painted: their labels [y, x] uint8, 255 = not painted.
    targets: {z: raw slice [y, x, C]} to segment.
    num_classes: classes of the stack.
    prior: default `load_prior()`.
    seed: the forest's seed.
    forest: its settings (default `ForestConfig()`, the forest route's).

  Returns:
    The segmentations of `targets`, with the wall time of each part.
  """
  prior = load_prior() if prior is None else prior
  route, fit_seconds = fit_forest(images, painted, num_classes, seed=seed, forest=forest)
  return correct(route, targets, prior, fit_seconds=fit_seconds)


def correct(
  route: Any, targets: dict[int, np.ndarray], prior: Prior, *, fit_seconds: float = 0.0
) -> Preview:
  """The correct step of `from_painted`: the fitted forest's probabilities of each
  target slice {z: raw [y, x, C]}, corrected by the prior.

  Returns:
    A `Preview` (its "fit" time `fit_seconds`).
  """
  seconds = {"fit": fit_seconds, "forest": 0.0, "enhance": 0.0}
  out, forest_out, probs_out = {}, {}, {}
  for z, raw in targets.items():
    start = time.perf_counter()
    probs = route.probabilities(raw)
    seconds["forest"] += time.perf_counter() - start
    start = time.perf_counter()
    enhanced = enhance(prior, route.normalised(raw), probs)
    seconds["enhance"] += time.perf_counter() - start
    out[z] = enhanced.argmax(-1).astype(np.uint8)
    forest_out[z] = probs.argmax(-1).astype(np.uint8)
    probs_out[z] = enhanced
  return Preview(
    labels=out,
    forest_labels=forest_out,
    probabilities=probs_out,
    seconds={k: round(v, 2) for k, v in seconds.items()},
    training_slices=(),
  )


def preview(
  volume: volume_lib.Volume,
  channels: Sequence[str],
  slices: Sequence[int],
  *,
  prior: Prior | None = None,
  exclude: Sequence[int] = (),
  seed: int = 0,
  forest: baselines.ForestConfig | None = None,
) -> Preview:
  """Fits a forest on the volume's painted pixels and segments `slices` with the prior.

  Args:
    volume: an opened volume with labels on some slices (255 = not painted).
    channels: the channels to use, in order.
    slices: z of the slices to segment.
    prior: default `load_prior()`.
    exclude: annotated slices whose labels the forest must not see (evaluation).
    seed: the forest's seed.
    forest: its settings (default `ForestConfig()`, the forest route's).

  Returns:
    The segmentations, with the wall time of each part.

  Raises:
    ValueError: no annotated slice left to fit on, or a slice outside the stack.
  """
  nz = volume.shape[0]
  bad = [z for z in slices if not 0 <= z < nz]
  if bad:
    raise ValueError(f"slices {bad} outside the stack (0..{nz - 1})")
  images, labels = baselines.training_slices(
    volume, channels, eval_slices=tuple(exclude), val_fraction=0.0
  )
  if not images:
    raise ValueError(
      "no annotated slice to fit the forest on (annotated: "
      f"{list(volume.metadata.annotated_slices)}, left out: {list(exclude)})"
    )
  index = volume.channel_indices(channels)
  targets = {int(z): volume.read_image(int(z))[..., index] for z in slices}
  result = from_painted(
    list(images.values()),
    list(labels.values()),
    targets,
    len(volume.classes),
    prior=prior,
    seed=seed,
    forest=forest,
  )
  return dataclasses.replace(result, training_slices=tuple(images))
