"""A random forest on multiscale filter features: the ilastik / Trainable Weka route.

Features are scikit-image's `multiscale_basic_features` (Gaussian-smoothed intensity,
gradient magnitude and the two Hessian eigenvalues at sigmas from `sigma_min` to
`sigma_max`, for every channel); the classifier is scikit-learn's
`RandomForestClassifier`, trained on a class-balanced sample of the annotated training
pixels. Features are computed tile by tile with a halo of 4 sigma_max (the Gaussian's
truncation), so a slice of any size is segmented in bounded memory and the result equals
the whole-slice features.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
from skimage import feature
from sklearn import ensemble

from fibseg_jax.data import volume as volume_lib

IGNORE_LABEL = volume_lib.IGNORE_LABEL


@dataclasses.dataclass(frozen=True)
class ForestConfig:
  """Features and forest of `RandomForest`.

  Attributes:
    sigma_min: smallest feature scale in pixels.
    sigma_max: largest feature scale in pixels.
    num_sigma: scales between them (log-spaced); None: one per octave.
    intensity, edges, texture: which feature families.
    n_estimators: trees.
    max_depth: tree depth limit (None: grow until pure).
    min_samples_leaf: smallest leaf.
    samples_per_class: training pixels drawn per class (all of a class if it has fewer).
    tile: y-x side of the tiles features are computed on.
    n_jobs: threads of the forest (1 on a shared machine).
  """

  sigma_min: float = 0.5
  sigma_max: float = 16.0
  num_sigma: int | None = None
  intensity: bool = True
  edges: bool = True
  texture: bool = True
  n_estimators: int = 50
  max_depth: int | None = 20
  min_samples_leaf: int = 2
  samples_per_class: int = 20_000
  tile: int = 1024
  n_jobs: int = 1

  def __post_init__(self):
    if not 0 < self.sigma_min <= self.sigma_max:
      raise ValueError(
        f"forest.sigma_min={self.sigma_min}, sigma_max={self.sigma_max}: need 0 < min <= max"
      )
    for name in ("n_estimators", "min_samples_leaf", "samples_per_class", "tile", "n_jobs"):
      if int(getattr(self, name)) < 1:
        raise ValueError(f"forest.{name}={getattr(self, name)} must be >= 1")

  def to_json(self) -> dict[str, Any]:
    return dataclasses.asdict(self)

  @property
  def halo(self) -> int:
    """Pixels of context a tile needs on each side (the Gaussian's 4-sigma support)."""
    return int(math.ceil(4 * self.sigma_max)) + 1


def features(image: np.ndarray, config: ForestConfig = ForestConfig()) -> np.ndarray:
  """Multiscale filter features of a whole slice [y, x, C]: float32 [y, x, F]."""
  return feature.multiscale_basic_features(
    np.asarray(image, np.float32),
    intensity=config.intensity,
    edges=config.edges,
    texture=config.texture,
    sigma_min=config.sigma_min,
    sigma_max=config.sigma_max,
    num_sigma=config.num_sigma,
    channel_axis=-1,
  ).astype(np.float32, copy=False)


def tiled_features(
  image: np.ndarray, config: ForestConfig = ForestConfig()
) -> Iterator[tuple[slice, slice, np.ndarray]]:
  """Features of a slice [y, x, C] tile by tile: (ys, xs, float32 [tile_y, tile_x, F]).

  Each tile is computed with `config.halo` pixels of its neighbours around it, so the
  tiles equal `features(image)[ys, xs]` up to the Gaussian's truncation.
  """
  ny, nx = image.shape[:2]
  tile, halo = config.tile, config.halo
  for y0 in range(0, ny, tile):
    for x0 in range(0, nx, tile):
      y1, x1 = min(y0 + tile, ny), min(x0 + tile, nx)
      ry0, rx0 = max(y0 - halo, 0), max(x0 - halo, 0)
      ry1, rx1 = min(y1 + halo, ny), min(x1 + halo, nx)
      f = features(image[ry0:ry1, rx0:rx1], config)
      yield slice(y0, y1), slice(x0, x1), f[y0 - ry0 : y1 - ry0, x0 - rx0 : x1 - rx0]


class RandomForest:
  """Pixel classifier on multiscale features of the (normalised) channels.

  Attributes:
    num_classes: k.
    config: features and forest settings.
    seed: seed of the pixel sample and of the forest.
    classifier: the fitted `sklearn.ensemble.RandomForestClassifier`.
  """

  def __init__(self, num_classes: int, config: ForestConfig = ForestConfig(), *, seed: int = 0):
    self.num_classes = int(num_classes)
    self.config = config
    self.seed = int(seed)
    self.classifier: ensemble.RandomForestClassifier | None = None

  @property
  def num_parameters(self) -> int:
    """Nodes over all trees of the fitted forest."""
    if self.classifier is None:
      return 0
    return int(sum(tree.tree_.node_count for tree in self.classifier.estimators_))

  def _sample(self, labels: Sequence[np.ndarray]) -> list[np.ndarray]:
    """Flat indices of the training pixels drawn from each slice, class-balanced."""
    rng = np.random.default_rng([self.seed, 1])
    per_slice: list[list[np.ndarray]] = [[] for _ in labels]
    for k in range(self.num_classes):
      where = [np.flatnonzero(label.ravel() == k) for label in labels]
      total = sum(len(w) for w in where)
      if total == 0:
        continue
      size = min(total, self.config.samples_per_class)
      take = np.sort(rng.choice(total, size=size, replace=False))
      bounds = np.cumsum([0] + [len(w) for w in where])
      for i, w in enumerate(where):
        inside = take[(take >= bounds[i]) & (take < bounds[i + 1])] - bounds[i]
        per_slice[i].append(w[inside])
    return [np.sort(np.concatenate(p)) if p else np.zeros(0, np.int64) for p in per_slice]

  def fit(self, images: Sequence[np.ndarray], labels: Sequence[np.ndarray]) -> RandomForest:
    """Trains the forest on a class-balanced sample of the labelled pixels.

    Args:
      images: training slices [y, x, C], float32, normalised alike.
      labels: their labels [y, x] uint8; 255 = not a training pixel.

    Returns:
      self.

    Raises:
      ValueError: no labelled pixel.
    """
    picks = self._sample(labels)
    x_parts, y_parts = [], []
    for image, label, pick in zip(images, labels, picks, strict=True):
      if not pick.size:
        continue
      width = label.shape[1]
      py, px = pick // width, pick % width
      for ys, xs, f in tiled_features(image, self.config):
        inside = (py >= ys.start) & (py < ys.stop) & (px >= xs.start) & (px < xs.stop)
        if inside.any():
          x_parts.append(f[py[inside] - ys.start, px[inside] - xs.start])
          y_parts.append(label[py[inside], px[inside]])
    if not x_parts:
      raise ValueError("RandomForest.fit: the training slices hold no labelled pixel")
    c = self.config
    self.classifier = ensemble.RandomForestClassifier(
      n_estimators=c.n_estimators,
      max_depth=c.max_depth,
      min_samples_leaf=c.min_samples_leaf,
      n_jobs=c.n_jobs,
      random_state=self.seed,
    )
    self.classifier.fit(np.concatenate(x_parts), np.concatenate(y_parts))
    return self

  def probabilities(self, image: np.ndarray) -> np.ndarray:
    """Class probabilities of a slice [y, x, C] normalised as in `fit`: float32 [y, x, k].

    A class without a training pixel gets probability 0.
    """
    if self.classifier is None:
      raise ValueError("RandomForest.probabilities called before fit")
    out = np.zeros((*image.shape[:2], self.num_classes), np.float32)
    classes = self.classifier.classes_.astype(np.intp)
    for ys, xs, f in tiled_features(image, self.config):
      proba = self.classifier.predict_proba(f.reshape(-1, f.shape[-1]))
      out[ys, xs][..., classes] = proba.reshape(*f.shape[:2], -1)
    return out

  def predict(self, image: np.ndarray) -> np.ndarray:
    """Labels of a slice [y, x, C] normalised as in `fit`: uint8 [y, x]."""
    if self.classifier is None:
      raise ValueError("RandomForest.predict called before fit")
    return np.argmax(self.probabilities(image), axis=-1).astype(np.uint8)
