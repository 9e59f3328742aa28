"""The augmentation maths: the symmetries of a slab and the intensity jitter.

One definition of the symmetry set, used by the training loader (numpy, on views of the
raw patch), the semi-supervised step (`train.state.semi_views`, jax) and test-time
augmentation (`infer.predict.augmented_mean`, jax): a `Symmetry` is the slab reversed
along z, flips of y and x and quarter turns in the y-x plane, always applied in that
order, and `apply` / `undo` take the array module (`numpy` or `jax.numpy`) and the axes.
Quarter turns need square y-x windows; the flips and the reversal fit any shape.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np


class Symmetry(NamedTuple):
  """One element of the symmetry set, applied in field order.

  Attributes:
    reverse: reverse the slices of a slab (its z axis).
    flip_y: flip along y.
    flip_x: flip along x.
    turns: counter-clockwise quarter turns in the y-x plane (y towards x), 0..3.
  """

  reverse: bool = False
  flip_y: bool = False
  flip_x: bool = False
  turns: int = 0


def apply(x: Any, s: Symmetry, *, y_axis: int, slab_axis: int | None = None, xp: Any = np) -> Any:
  """Moves `x` by `s`: reversal (if `slab_axis` is given), flip y, flip x, then turns.

  Args:
    x: an array with y and x at axes `y_axis`, `y_axis + 1` (e.g. a slab [slices, y, x,
      channels] with y_axis=1, slab_axis=0, or labels [y, x] with y_axis=0).
    s: the symmetry.
    y_axis: the y axis; x follows it.
    slab_axis: the slice axis reversed by `s.reverse`; None leaves the slice order alone.
    xp: `numpy` (views of x) or `jax.numpy`.

  Returns:
    x moved; same shape where `s.turns` is even or y and x have the same size.
  """
  if s.reverse and slab_axis is not None:
    x = xp.flip(x, slab_axis)
  if s.flip_y:
    x = xp.flip(x, y_axis)
  if s.flip_x:
    x = xp.flip(x, y_axis + 1)
  if s.turns % 4:
    x = xp.rot90(x, int(s.turns), axes=(y_axis, y_axis + 1))
  return x


def undo(x: Any, s: Symmetry, *, y_axis: int, slab_axis: int | None = None, xp: Any = np) -> Any:
  """The inverse of `apply`: maps an output of the moved input back onto the unmoved one.

  Args and Returns as `apply`; e.g. logits [batch, y, x, classes] with y_axis=1 and no
  slab axis (a model's output has none, so `s.reverse` needs no undoing there).
  """
  if s.turns % 4:
    x = xp.rot90(x, -int(s.turns), axes=(y_axis, y_axis + 1))
  if s.flip_x:
    x = xp.flip(x, y_axis + 1)
  if s.flip_y:
    x = xp.flip(x, y_axis)
  if s.reverse and slab_axis is not None:
    x = xp.flip(x, slab_axis)
  return x


def square_symmetries() -> tuple[Symmetry, ...]:
  """The 8 symmetries of a square in the y-x plane (x flip, then 0-3 quarter turns)."""
  return tuple(Symmetry(flip_x=flip, turns=k) for flip in (False, True) for k in range(4))


def test_time_symmetries(square: bool, slab: bool) -> tuple[Symmetry, ...]:
  """The symmetries averaged over by test-time augmentation, in summation order.

  Args:
    square: the y-x window is square, so quarter turns fit (else 0 or 2 turns, which
      with the x flip are the 4 flips).
    slab: the input has several slices, so the slab reversal counts.

  Returns:
    16, 8 or 4 symmetries: for each reversal, each number of turns k, the x flip off or
    on; "turn k then flip x" is the same permutation as "flip x then turn -k".
  """
  turns = (0, 1, 2, 3) if square else (0, 2)
  reversals = (False, True) if slab else (False,)
  return tuple(
    Symmetry(reverse=z, flip_x=f, turns=(-k) % 4 if f else k)
    for z in reversals
    for k in turns
    for f in (False, True)
  )


def intensity(
  x: np.ndarray,
  norm_offset: np.ndarray,
  norm_scale: np.ndarray,
  gain: np.ndarray,
  offset: np.ndarray,
  gamma: np.ndarray,
  invert: np.ndarray | None = None,
) -> None:
  """Normalises and jitters one slab in place.

  x <- (x - norm_offset) * norm_scale, then gamma on the [0, 1] map u = (x + 1) / 2 of the
  normalised range, leaving values outside [0, 1] as they are (u**g is 0 and 1 at the
  ends, so the curve stays continuous and hot pixels keep their excess), then
  x <- x * gain + offset.

  Args:
    x: [slices, patch, patch, channels] float32 raw intensities, modified in place.
    norm_offset, norm_scale: [channels] the volume's normalisation.
    gain, offset, gamma: [channels] this sample's jitter (1, 0, 1: none).
    invert: [channels] bool: the gamma bends the inverted image, 1 - (1 - u)**g.
  """
  x -= norm_offset
  x *= norm_scale
  flip = None if invert is None or not invert.any() else np.where(invert, -1, 1).astype(x.dtype)
  if (gamma != 1).any():
    if flip is not None:
      x *= flip
    # u**g - u is 0 wherever u is clipped, so adding it leaves out-of-range values alone.
    u = np.clip(x, -1, 1)
    u += 1
    u *= 0.5
    # exp(g log u) is the same curve, and numpy's float32 exp and log are vectorised
    # where its power is not (about 1.4x faster here).
    with np.errstate(divide="ignore"):
      bend = np.log(u)
    bend *= gamma
    np.exp(bend, out=bend)
    bend -= u
    bend *= 2
    x += bend
    if flip is not None:
      x *= flip
  if (gain != 1).any():
    x *= gain
  if (offset != 0).any():
    x += offset


# The recipe beyond the symmetries: a resampling warp (rotation, scaling, elastic
# deformation, drift between slices), FIB-SEM artifacts and image degradations. Their
# per-patch parameters are drawn in `plans` from (seed, step); the random fields (elastic
# displacements, stripe positions, noise) come from the patch's own `field_seed`, so a
# patch is the same whichever thread or process computes it.


class Jitter(NamedTuple):
  """The intensity augmentation of one patch; [channels] arrays, the identity values off.

  Attributes:
    gain, offset: x <- x * gain + offset on the normalised image (1, 0: none); the gain is
      the multiplicative brightness of nnU-Net's recipe.
    gamma: exponent of the gamma curve (1: none).
    invert: bool, apply the gamma to the inverted image (nnU-Net's inverted gamma).
    contrast: x <- (x - mean) * contrast + mean over the patch (1: none).
    noise: standard deviation of additive Gaussian noise (0: none).
    blur: sigma of a Gaussian blur in y-x, pixels (0: none).
    lowres: simulated low resolution: downsample by this factor in (0, 1], then back
      (1: none).
    curtain: depth of the curtaining stripes (0: none), signed stripes along the milling
      direction (y of the volume) within a few degrees.
    shading: amplitude of a smooth multiplicative detector-shading field (0: none).
    charging: amplitude of bright charging streaks along the scan lines and bright
      patches (0: none).
  """

  gain: np.ndarray
  offset: np.ndarray
  gamma: np.ndarray
  invert: np.ndarray
  contrast: np.ndarray
  noise: np.ndarray
  blur: np.ndarray
  lowres: np.ndarray
  curtain: np.ndarray
  shading: np.ndarray
  charging: np.ndarray

  @classmethod
  def none(cls, channels: int) -> Jitter:
    """No intensity augmentation."""
    ones, zeros = np.ones(channels, np.float32), np.zeros(channels, np.float32)
    return cls(
      ones, zeros, ones, np.zeros(channels, bool), ones, zeros, zeros, ones, zeros, zeros, zeros
    )


class Warp(NamedTuple):
  """The resampling of one patch: where each output pixel reads the volume.

  Output pixel (u, v) of slice j reads volume position
    centre + scale * R(angle) (u - c, v - c) + elastic(u, v) + drift[j],
  with c = (patch - 1) / 2 and R the rotation from y towards x.

  Attributes:
    angle: in-plane rotation, radians.
    scale: zoom factor (> 1 reads a larger area, so structures look smaller).
    elastic: magnitude of the smooth displacement field, pixels (0: none); clipped to
      3 x elastic.
    drift: [slices, 2] in-plane (y, x) shift of each slice of the slab, pixels; the
      central slice, whose labels are read, keeps 0.
    field_seed: seed of the elastic field.
  """

  angle: float
  scale: float
  elastic: float
  drift: np.ndarray
  field_seed: int

  @property
  def identity(self) -> bool:
    return self.angle == 0 and self.scale == 1 and self.elastic == 0 and not self.drift.any()

  def reach(self, patch: int) -> float:
    """The largest distance, per axis, of a read position from the patch centre."""
    half = self.scale * (patch - 1) / 2 * (abs(np.cos(self.angle)) + abs(np.sin(self.angle)))
    return half + 3 * self.elastic + float(np.abs(self.drift).max(initial=0)) + 1


ELASTIC_GRID = 32  # pixels between the control points of the elastic field


def _interpolation_matrix(n_out: int, n_in: int, smooth: bool) -> np.ndarray:
  """[n_out, n_in] float32 weights resampling n_in points spread over n_out positions:
  linear interpolation, or (smooth) normalised Gaussian weights of one grid step."""
  t = np.linspace(0, n_in - 1, n_out, dtype=np.float32)[:, None]
  k = np.arange(n_in, dtype=np.float32)[None, :]
  if smooth:
    w = np.exp(-0.5 * ((t - k) / 0.7) ** 2)
  else:
    w = np.maximum(0, 1 - np.abs(t - k))
  return (w / w.sum(1, keepdims=True)).astype(np.float32)


def _smooth_field(rng: np.random.Generator, patch: int, spacing: int, k: int = 1) -> np.ndarray:
  """[k, patch, patch] float32 smooth random fields: Gaussian values on a grid `spacing`
  apart, interpolated by separable Gaussian weights and scaled to unit standard deviation."""
  n = max(2, int(np.ceil(patch / spacing)) + 1)
  grid = rng.standard_normal((k, n, n)).astype(np.float32)
  w = _interpolation_matrix(patch, n, smooth=True)
  fields = w @ grid @ w.T
  return fields / np.maximum(fields.std(axis=(1, 2), keepdims=True), 1e-6)


def warp_coordinates(w: Warp, patch: int, slices: int) -> np.ndarray:
  """[slices, 2, patch, patch] float32 (y, x) read positions relative to the patch centre."""
  c = (patch - 1) / 2
  d = np.arange(patch, dtype=np.float32) - c
  dy, dx = np.meshgrid(d, d, indexing="ij")
  cos, sin = np.float32(np.cos(w.angle) * w.scale), np.float32(np.sin(w.angle) * w.scale)
  base = np.stack([cos * dy - sin * dx, sin * dy + cos * dx])
  if w.elastic > 0:
    field = _smooth_field(np.random.default_rng(w.field_seed), patch, ELASTIC_GRID, 2)
    base += np.clip(field * w.elastic, -3 * w.elastic, 3 * w.elastic)
  return base[None] + w.drift.astype(np.float32)[:, :, None, None]


def warp_window(w: Warp, y0: int, x0: int, patch: int, shape: tuple[int, int]) -> tuple[int, ...]:
  """The volume window (ya, yb, xa, xb) a warped patch at (y0, x0) reads, clipped."""
  c = (patch - 1) / 2
  r = w.reach(patch)
  ya, yb = int(np.floor(y0 + c - r)), int(np.ceil(y0 + c + r)) + 1
  xa, xb = int(np.floor(x0 + c - r)), int(np.ceil(x0 + c + r)) + 1
  return max(ya, 0), min(yb, shape[0]), max(xa, 0), min(xb, shape[1])


def warp_slab(
  slab: np.ndarray,
  labels: np.ndarray | None,
  coords: np.ndarray,
  origin: tuple[float, float],
  ignore: int,
) -> tuple[np.ndarray, np.ndarray | None]:
  """Resamples a slab window and its central labels at `coords`.

  Args:
    slab: [slices, wy, wx, channels] raw window, starting at volume position `origin`.
    labels: [wy, wx] labels of the central slice of the same window, or None.
    coords: [slices, 2, patch, patch] volume read positions (`warp_coordinates` plus the
      patch centre).
    origin: (y, x) of the window's first pixel in the volume.
    ignore: the label of pixels read outside the window (outside the volume).

  Returns:
    (float32 [slices, patch, patch, channels] bilinear, mirrored at the window's edges,
     which are the volume's wherever the patch reaches past it; uint8 [patch, patch]
     nearest labels, `ignore` outside the window, or None).
  """
  import scipy.ndimage as ndi  # noqa: PLC0415 - only the augmenting workers need scipy

  s, _, p, _ = coords.shape
  oy, ox = origin
  out = np.empty((s, p, p, slab.shape[-1]), np.float32)
  for j in range(s):
    at = [coords[j, 0] - oy, coords[j, 1] - ox]
    for ch in range(slab.shape[-1]):
      ndi.map_coordinates(
        slab[j, :, :, ch].astype(np.float32), at, output=out[j, :, :, ch], order=1, mode="mirror"
      )
  lab = None if labels is None else nearest(labels, coords[s // 2], origin, ignore)
  return out, lab


def nearest(
  values: np.ndarray, coords: np.ndarray, origin: tuple[float, float], fill: int
) -> np.ndarray:
  """Nearest-neighbour resampling of a window's per-pixel values (labels, probabilities).

  Each output pixel is a copy of one source pixel, so no value is invented (255 stays
  255, a probability vector stays one).

  Args:
    values: [wy, wx, ...] of the window starting at volume position `origin`.
    coords: [2, patch, patch] volume read positions.
    origin: (y, x) of the window's first pixel in the volume.
    fill: the value of pixels read outside the window.

  Returns:
    [patch, patch, ...] of `values`' dtype.
  """
  oy, ox = origin
  at = np.round(np.stack([coords[0] - oy, coords[1] - ox])).astype(np.int64)
  inside = (at[0] >= 0) & (at[0] < values.shape[0]) & (at[1] >= 0) & (at[1] < values.shape[1])
  out = np.full((*coords.shape[1:], *values.shape[2:]), fill, values.dtype)
  out[inside] = values[at[0][inside], at[1][inside]]
  return out


def _stripe_profile(rng: np.random.Generator, length: int, depth: float) -> np.ndarray:
  """[length] float32: signed stripes of random width (1-8 px), depth and spacing."""
  t = np.arange(length, dtype=np.float32)
  profile = np.zeros(length, np.float32)
  count = rng.poisson(length / 24) + 1
  for centre, width, amp in zip(
    rng.uniform(0, length, count),
    rng.uniform(1, 8, count),
    rng.uniform(-1, 1, count) * depth,
    strict=True,
  ):
    profile += np.float32(amp) * np.exp(-0.5 * ((t - centre) / np.float32(width)) ** 2)
  return profile


def artifact_field(
  jitter: Jitter, ch: int, patch: int, angle: float, rng: np.random.Generator
) -> tuple[np.ndarray | None, np.ndarray | None]:
  """The FIB-SEM artifacts of one channel in the output frame of a patch.

  Curtaining runs along the milling direction, the volume's y axis: stripes of a profile
  across x' (the volume's x turned by `angle` and a random few degrees), their depth
  fading along y'. Charging brightens scan lines (rows of the volume) with an exponential
  trail along x' and a few bright patches. Shading is a smooth field.

  Returns:
    (additive [patch, patch] float32 or None, multiplicative [patch, patch] or None).
  """
  add = mul = None
  c = (patch - 1) / 2
  d = np.arange(patch, dtype=np.float32) - c
  dy, dx = np.meshgrid(d, d, indexing="ij")
  reach = int(np.ceil(patch * 1.5)) + 2
  if jitter.curtain[ch] > 0:
    tilt = angle + rng.uniform(-1, 1) * np.deg2rad(4)
    across = np.sin(tilt) * dy + np.cos(tilt) * dx + reach / 2
    along = np.cos(tilt) * dy - np.sin(tilt) * dx
    profile = _stripe_profile(rng, reach, float(jitter.curtain[ch]))
    fade = 1 - rng.uniform(0, 0.8) * (along / patch + 0.5)
    add = np.interp(across, np.arange(reach), profile).astype(np.float32) * fade
  if jitter.charging[ch] > 0:
    amp = float(jitter.charging[ch])
    rows = np.cos(angle) * dy - np.sin(angle) * dx + reach / 2
    along = np.sin(angle) * dy + np.cos(angle) * dx + c
    streak = np.zeros(reach, np.float32)
    for row in rng.integers(0, reach, rng.integers(1, 4)):
      streak[row : row + rng.integers(1, 4)] = amp * rng.uniform(0.5, 1)
    start = rng.uniform(0, patch)
    trail = np.interp(rows, np.arange(reach), streak) * np.exp(-np.maximum(along - start, 0) / 48)
    trail *= along >= start
    for _ in range(rng.integers(0, 3)):
      py, px, r = rng.uniform(-c, c), rng.uniform(-c, c), rng.uniform(2, max(patch / 6, 3))
      trail += amp * rng.uniform(0.5, 1) * np.exp(-((dy - py) ** 2 + (dx - px) ** 2) / (2 * r * r))
    add = trail.astype(np.float32) if add is None else add + trail
  if jitter.shading[ch] > 0:
    field = _smooth_field(rng, patch, max(patch // 2, 2))[0]
    mul = (1 + float(jitter.shading[ch]) * np.tanh(field)).astype(np.float32)
  return add, mul


def _lowres(x: np.ndarray, factor: float) -> np.ndarray:
  """[y, x] downsampled by `factor` (nearest) and back up (linear)."""
  import scipy.ndimage as ndi  # noqa: PLC0415

  h, w = x.shape
  sh, sw = max(1, round(h * factor)), max(1, round(w * factor))
  small = x[(np.arange(sh) * h) // sh][:, (np.arange(sw) * w) // sw]
  up = ndi.zoom(small, (h / sh, w / sw), order=1, mode="nearest", grid_mode=False)
  return up[:h, :w]


def degrades(jitter: Jitter) -> bool:
  """Whether `degrade` changes anything for this jitter."""
  return bool(
    (jitter.contrast != 1).any()
    or (jitter.noise > 0).any()
    or (jitter.blur > 0).any()
    or (jitter.lowres < 1).any()
    or (jitter.curtain > 0).any()
    or (jitter.shading > 0).any()
    or (jitter.charging > 0).any()
  )


def degrade(
  x: np.ndarray,
  jitter: Jitter,
  *,
  angle: float,
  field_seed: int,
  symmetry: Symmetry,
) -> None:
  """The FIB-SEM artifacts and image degradations of one normalised slab, in place.

  Applied per channel, each detector on its own: curtaining, charging and shading
  (drawn in the volume's frame, then moved by the patch's `angle` and `symmetry` so they
  lie as in the real images), then contrast, blur, low resolution and noise. The
  gamma, gain and offset of `jitter` are `intensity`'s.

  Args:
    x: [slices, patch, patch, channels] float32, normalised and moved by `symmetry`.
    jitter: the patch's parameters.
    angle: the patch's warp rotation (radians), so the stripes follow the milling axis.
    field_seed: seed of the random fields.
    symmetry: the patch's flips and turns, applied to the artifact fields.
  """
  import scipy.ndimage as ndi  # noqa: PLC0415

  patch = x.shape[1]
  rng = np.random.default_rng([field_seed, 1])
  for ch in range(x.shape[-1]):
    add, mul = artifact_field(jitter, ch, patch, angle, rng)
    if mul is not None:  # around the black level -1 of the normalised range
      x[..., ch] += 1
      x[..., ch] *= apply(mul, symmetry, y_axis=0)
      x[..., ch] -= 1
    if add is not None:
      x[..., ch] += apply(add, symmetry, y_axis=0)
    if jitter.contrast[ch] != 1:
      mean = x[..., ch].mean()
      x[..., ch] -= mean
      x[..., ch] *= jitter.contrast[ch]
      x[..., ch] += mean
    for j in range(x.shape[0]):
      if jitter.blur[ch] > 0:
        x[j, :, :, ch] = ndi.gaussian_filter(x[j, :, :, ch], float(jitter.blur[ch]), truncate=3)
      if jitter.lowres[ch] < 1:
        x[j, :, :, ch] = _lowres(x[j, :, :, ch], float(jitter.lowres[ch]))
    if jitter.noise[ch] > 0:
      x[..., ch] += rng.standard_normal(x.shape[:-1], np.float32) * jitter.noise[ch]
