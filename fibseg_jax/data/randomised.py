"""Domain-randomised FIB-SEM stacks: random phases, signals and artifacts, with truth.

Where `fibseg_jax.data.synth` renders one sample (cement paste) as one instrument images
it, this module draws a new sample and a new instrument for every seed, so that a network
trained on its draws has seen no particular material, contrast or artifact strength
(domain randomisation, as SynthSeg does for MRI). It is what the shipped prior
(`fibseg_jax.train.pretrain`) learns from. Every draw is deterministic per seed:

  stack = randomised.draw(seed=7, shape=(4, 256, 256))
  stack.image   # [z, y, x, channels] uint16 counts, 1-3 detectors
  stack.labels  # [z, y, x] uint8, 2-6 phases, every one present
  stack.params  # what was drawn, JSON-ready

What is drawn (the ranges are the module's constants):

  phases     2-6. Phase 0 is the matrix; each other phase is painted over the earlier
             ones with a random morphology: `blobs` (thresholded smooth field: grains,
             pores), `network` (where two smooth fields are both near zero: a connected
             pore or capillary network), `particles` (ellipsoids in the matrix, blob-like
             organelles), `layers` (a field stretched along y or x: elongated or layered
             phases), `cells` (Voronoi cells: polycrystalline grains) and `walls` (the
             Voronoi cell walls: thin boundaries, as membranes in biological EM).
  voxels     z spacing 1-8 times the in-plane pixel (anisotropic, as serial sections).
  signals    1-3 detectors; each phase's mean signal per detector drawn in [0.05, 0.95],
             every pair of phases apart in at least one detector, and with two or more
             detectors one pair made nearly equal in one of them (ICE / TLD-like).
             With probability `PORE_P` one phase is a pore: dark, showing the material
             behind it (shine-through).
  texture    within-phase smooth texture and beam blur.
  artifacts  each at a random severity, off with some probability: curtaining (tilted
             streaks along y, stronger below pores and bright grains), shading (a gain
             gradient and an occlusion shadow from one edge), charging (bright streaks
             along the scan lines after bright phases), drift (an in-plane random walk
             between slices, labels moved with the image), Poisson and read noise.
  storage    uint16 counts with a random offset and gain.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

import numpy as np
from scipy import ndimage, spatial

from fibseg_jax.data import synth

MIN_PHASES, MAX_PHASES = 2, 6
MIN_CHANNELS, MAX_CHANNELS = 1, 3
MORPHOLOGIES = ("blobs", "network", "particles", "layers", "cells", "walls")
# z spacing over the in-plane pixel size.
ANISOTROPY = (1.0, 8.0)
# Length scales of the morphologies, in in-plane pixels.
SCALE_PX = (3.0, 40.0)
# Smallest share of the volume a phase must keep to be a phase of the draw.
MIN_PHASE_SHARE = 0.01
# Mean phase signals lie in this range of the detector (0 = black, 1 = saturated).
SIGNAL_RANGE = (0.05, 0.95)
# Two phases must be at least this far apart in one detector...
MIN_CONTRAST = 0.08
# ... and one pair, with two or more detectors, is this close in one of them.
NEAR_EQUAL = 0.02
PORE_P = 0.5
# Each artifact is on with probability `ARTIFACT_P[name]`, then drawn in [0, max].
ARTIFACT_P = {"curtaining": 0.7, "shading": 0.7, "charging": 0.3, "drift": 0.5, "shine": 1.0}
ARTIFACT_MAX = {"curtaining": 0.35, "shading": 0.6, "charging": 0.5, "drift": 2.0, "shine": 0.8}
TEXTURE_MAX = 0.06
BLUR_MAX_PX = 1.5
# Electrons per pixel at signal 1 (log-uniform) and read-noise std.
DOSE_RANGE = (10.0, 400.0)
READ_NOISE_MAX = 0.05


@dataclasses.dataclass(frozen=True)
class RandomStack:
  """One draw.

  Attributes:
    image: [z, y, x, channels] uint16 detector counts.
    labels: [z, y, x] uint8 truth, values 0..num_classes-1, each present somewhere.
    num_classes: phases of the draw.
    params: what was drawn (morphologies, signals, severities, voxel spacing), JSON-ready.
    seed: the seed of the draw.
  """

  image: np.ndarray
  labels: np.ndarray
  num_classes: int
  params: dict[str, Any]
  seed: int

  @property
  def num_channels(self) -> int:
    return int(self.image.shape[-1])


def _field(rng: np.random.Generator, shape: Sequence[int], sigma_px: Sequence[float]) -> np.ndarray:
  """[z, y, x] unit-variance smooth field, sigma per axis in voxels of that axis."""
  # SmoothField takes one sigma over per-axis voxel sizes: voxel = 1 / sigma_axis.
  field = synth.SmoothField(rng, shape, [1.0 / max(s, 0.5) for s in sigma_px], 1.0)
  return field.block(0, shape[0])


def _threshold(field: np.ndarray, fraction: float) -> np.ndarray:
  return field > np.quantile(field, 1.0 - fraction)


def _voronoi(rng: np.random.Generator, shape: Sequence[int], scale: float, anisotropy: float):
  """Nearest and second-nearest seed distances and the nearest seed's index, per voxel."""
  nz, ny, nx = shape
  extent = np.array([nz * anisotropy, ny, nx], np.float64)
  count = int(np.clip(np.prod(extent + 2 * scale) / scale**3, 4, 4000))
  points = rng.uniform(0, 1, (count, 3)) * (extent + 2 * scale) - scale
  grid = np.stack(
    np.meshgrid(np.arange(nz) * anisotropy, np.arange(ny), np.arange(nx), indexing="ij"), -1
  )
  dist, index = spatial.cKDTree(points).query(grid.reshape(-1, 3), k=2)
  return dist[:, 0].reshape(shape), dist[:, 1].reshape(shape), index[:, 0].reshape(shape)


def _morphology(
  rng: np.random.Generator, kind: str, shape: Sequence[int], anisotropy: float
) -> tuple[np.ndarray, dict[str, Any]]:
  """The voxels of one phase, [z, y, x] bool, and its drawn parameters."""
  # Features of up to a sixth of the field, so a draw shows several of them.
  top = min(SCALE_PX[1], min(shape[1:]) / 6)
  scale = float(np.exp(rng.uniform(math.log(SCALE_PX[0]), math.log(max(top, SCALE_PX[0])))))
  sz = scale / anisotropy
  params: dict[str, Any] = {"kind": kind, "scale_px": round(scale, 2)}
  if kind == "blobs":
    fraction = rng.uniform(0.05, 0.35)
    params["fraction"] = round(fraction, 3)
    return _threshold(_field(rng, shape, (sz, scale, scale)), fraction), params
  if kind == "network":
    width = rng.uniform(0.2, 0.45)
    params["width"] = round(width, 3)
    a = _field(rng, shape, (sz, scale, scale))
    b = _field(rng, shape, (sz, scale, scale))
    return (np.abs(a) < width) & (np.abs(b) < width), params
  if kind == "layers":
    stretch = rng.uniform(3, 10)
    along_x = bool(rng.integers(2))
    fraction = rng.uniform(0.1, 0.4)
    params.update(stretch=round(stretch, 2), along="x" if along_x else "y")
    sigma = (sz, scale, scale * stretch) if along_x else (sz * stretch, scale * stretch, scale)
    return _threshold(_field(rng, shape, sigma), fraction), params
  if kind == "particles":
    radius = max(scale / 2, 1.5)
    aspect = rng.uniform(1, 3)
    fraction = rng.uniform(0.03, 0.25)
    params.update(radius_px=round(radius, 2), aspect=round(aspect, 2), fraction=round(fraction, 3))
    nz, ny, nx = shape
    extent = np.array([nz * anisotropy, ny, nx])
    count = int(np.clip(fraction * np.prod(extent) / (4.19 * radius**3 * aspect), 1, 2000))
    centres = rng.uniform(0, 1, (count, 3)) * (extent + 2 * radius) - radius
    radii = radius * np.exp(rng.normal(0, 0.3, (count, 1))) * np.array([[1, aspect, 1]])
    radii = np.where(rng.integers(2, size=(count, 1)), radii, radii[:, [0, 2, 1]])
    mask = np.zeros(shape, bool)
    zz = np.arange(nz)[:, None, None] * anisotropy
    yy, xx = np.arange(ny)[None, :, None], np.arange(nx)[None, None, :]
    for (cz, cy, cx), (rz, ry, rx) in zip(centres, radii, strict=True):
      y0, y1 = max(int(cy - ry) - 1, 0), min(int(cy + ry) + 2, ny)
      x0, x1 = max(int(cx - rx) - 1, 0), min(int(cx + rx) + 2, nx)
      if y0 >= y1 or x0 >= x1:
        continue
      inside = ((zz - cz) / rz) ** 2 + ((yy[:, y0:y1] - cy) / ry) ** 2 + (
        (xx[..., x0:x1] - cx) / rx
      ) ** 2 <= 1
      mask[:, y0:y1, x0:x1] |= inside
    return mask, params
  if kind in ("cells", "walls"):
    d1, d2, index = _voronoi(rng, shape, scale * 1.5, anisotropy)
    if kind == "walls":
      width = rng.uniform(0.6, 2.0)
      params["width_px"] = round(width, 2)
      return (d2 - d1) < width, params
    fraction = rng.uniform(0.2, 0.6)
    params["fraction"] = round(fraction, 3)
    chosen = rng.random(int(index.max()) + 1) < fraction
    return chosen[index], params
  raise ValueError(f"unknown morphology {kind!r}; expected one of {MORPHOLOGIES}")


def _signals(rng: np.random.Generator, num_classes: int, num_channels: int, pore: int | None):
  """[class, channel] mean signals: every pair apart in one detector, one pair near-equal."""
  lo, hi = SIGNAL_RANGE
  for _ in range(1000):
    signal = rng.uniform(lo, hi, (num_classes, num_channels))
    if pore is not None:
      signal[pore] = rng.uniform(0.0, 0.12, num_channels)
    if num_channels > 1 and num_classes > 2:
      a, b = rng.choice([k for k in range(num_classes) if k != pore], 2, replace=False)
      c = rng.integers(num_channels)
      signal[b, c] = np.clip(signal[a, c] + rng.uniform(-NEAR_EQUAL, NEAR_EQUAL), lo, hi)
    apart = np.abs(signal[:, None] - signal[None, :]).max(-1)
    if (apart + np.eye(num_classes) >= MIN_CONTRAST).all():
      return signal.astype(np.float32)
  raise AssertionError("no separable signals drawn")  # not reached for <= 6 classes


def _severity(rng: np.random.Generator, name: str) -> float:
  if rng.random() >= ARTIFACT_P[name]:
    return 0.0
  return float(rng.uniform(0, ARTIFACT_MAX[name]))


def _curtain_pattern(rng: np.random.Generator, ny: int, nx: int, labels: np.ndarray, dark):
  """[y, x] streaks along y, tilted a few degrees, stronger below dark or bright phases."""
  n = 2 * (nx + ny)
  profile = ndimage.gaussian_filter1d(rng.standard_normal(n), rng.uniform(0.7, 4.0), mode="wrap")
  profile = np.sign(profile) * np.abs(profile / profile.std()) ** 1.5
  profile /= profile.std()
  angle = math.radians(rng.uniform(-5, 5))
  u = np.arange(nx)[None, :] * math.cos(angle) + np.arange(ny)[:, None] * math.sin(angle)
  streaks = np.interp(u, np.arange(n) - ny, profile, period=n)
  # Grooves start at obstacles and fade below them (+y), as milling curtains do.
  decay = math.exp(-1.0 / rng.uniform(20, 200))
  trail = np.zeros((ny, nx))
  carry = np.zeros(nx)
  for y in range(ny):
    carry = decay * carry + (1 - decay) * dark[labels[y]]
    trail[y] = carry
  return (streaks * (0.4 + 1.2 * trail / max(trail.max(), 1e-6))).astype(np.float32)


def _shading(rng: np.random.Generator, ny: int, nx: int, severity: float) -> np.ndarray:
  """[y, x] multiplicative response: a gain gradient and an occlusion shadow from one edge."""
  yy, xx = np.meshgrid(np.linspace(0, 1, ny), np.linspace(0, 1, nx), indexing="ij")
  theta = rng.uniform(0, 2 * math.pi)
  gradient = 0.5 + 0.5 * (np.cos(theta) * (yy - 0.5) + np.sin(theta) * (xx - 0.5)) * 1.4
  edge = [xx, 1 - xx, yy, 1 - yy][rng.integers(4)]
  shadow = np.exp(-edge / rng.uniform(0.1, 0.4))
  return np.maximum(1 - severity * (0.6 * gradient + shadow), 0.05).astype(np.float32)


def _charging(rng: np.random.Generator, signal: np.ndarray, severity: float) -> np.ndarray:
  """[y, x] additive brightness: streaks along the scan lines (+x) after bright regions."""
  bright = signal > np.quantile(signal, 0.9)
  decay = math.exp(-1.0 / rng.uniform(5, 60))
  out = np.zeros(signal.shape, np.float32)
  carry = np.zeros(signal.shape[0], np.float32)
  rows = rng.random(signal.shape[0]) < rng.uniform(0.05, 0.5)  # lines that charge
  for x in range(signal.shape[1]):
    carry = decay * carry + (1 - decay) * bright[:, x]
    out[:, x] = carry
  return severity * out * rows[:, None]


def draw(
  seed: int,
  shape: Sequence[int] = (4, 256, 256),
  *,
  num_classes: int | None = None,
  num_channels: int | None = None,
) -> RandomStack:
  """Draws a random FIB-SEM stack and its truth.

  Args:
    seed: the draw; the same seed and shape always give the same stack.
    shape: (z, y, x) in voxels.
    num_classes: phases (2-6); None draws it. A phase that ends up under
      `MIN_PHASE_SHARE` of the volume is dropped, so a draw can have fewer.
    num_channels: detectors (1-3); None draws it.

  Returns:
    The stack (see `RandomStack`).

  Raises:
    ValueError: a shape under (1, 16, 16), or a class or channel count out of range.
  """
  shape = tuple(int(s) for s in shape)
  if len(shape) != 3 or shape[0] < 1 or min(shape[1:]) < 16:
    raise ValueError(f"shape must be (z, y, x) with z >= 1 and y, x >= 16; got {shape}")
  if num_classes is not None and not MIN_PHASES <= num_classes <= MAX_PHASES:
    raise ValueError(f"num_classes={num_classes}: expected {MIN_PHASES}..{MAX_PHASES}")
  if num_channels is not None and not MIN_CHANNELS <= num_channels <= MAX_CHANNELS:
    raise ValueError(f"num_channels={num_channels}: expected {MIN_CHANNELS}..{MAX_CHANNELS}")
  rng = np.random.default_rng([int(seed), 20261207])
  k = int(rng.integers(MIN_PHASES, MAX_PHASES + 1)) if num_classes is None else num_classes
  c = int(rng.integers(MIN_CHANNELS, MAX_CHANNELS + 1)) if num_channels is None else num_channels
  anisotropy = float(rng.uniform(*ANISOTROPY))
  severity = {name: _severity(rng, name) for name in ARTIFACT_P}
  # One slice of look-ahead per few voxels of shine-through depth.
  behind = 3 if severity["shine"] > 0 else 0
  full = (shape[0] + behind, *shape[1:])

  labels = np.zeros(full, np.uint8)
  phases = [{"kind": "matrix"}]
  for phase in range(1, k):
    kind = str(rng.choice(MORPHOLOGIES))
    mask, params = _morphology(rng, kind, full, anisotropy)
    labels[mask] = phase
    phases.append(params)
  # Keep the phases that are really there, renumbered in order.
  counts = np.bincount(labels[: shape[0]].ravel(), minlength=k)
  kept = [p for p in range(k) if counts[p] >= MIN_PHASE_SHARE * labels[: shape[0]].size]
  if len(kept) < 2:  # one phase swallowed the rest: the matrix and the largest other one
    kept = sorted(np.argsort(counts)[-2:].tolist())
  remap = np.full(k, 0, np.uint8)
  for new, old in enumerate(kept):
    remap[old] = new
  # Dropped phases fall back to the first kept one (they were under the share).
  labels = remap[labels]
  phases = [phases[p] for p in kept]
  k = len(kept)

  pore = int(rng.integers(1, k)) if rng.random() < PORE_P else None
  signal = _signals(rng, k, c, pore)
  texture_amp = rng.uniform(0, TEXTURE_MAX, (k, c)).astype(np.float32)
  texture = _field(rng, full, (1.0, *(2 * [float(rng.uniform(1, 8))])))
  blur = float(rng.uniform(0, BLUR_MAX_PX))
  dose = np.exp(rng.uniform(*np.log(DOSE_RANGE), c)).astype(np.float32)
  read_noise = rng.uniform(0, READ_NOISE_MAX, c).astype(np.float32)
  curtain_depth = rng.uniform(0.5, 1.5, c).astype(np.float32)
  offset = rng.uniform(0, 8000, c).astype(np.float32)
  gain = rng.uniform(8000, 50000, c).astype(np.float32)
  # What starts curtains: the pore and the brightest phase.
  dark = np.zeros(k, np.float32)
  dark[int(np.argmax(signal.mean(1)))] = 1
  if pore is not None:
    dark[pore] = 1

  nz, ny, nx = shape
  shading = _shading(rng, ny, nx, severity["shading"]) if severity["shading"] else None
  shifts = np.zeros((nz, 2))
  if severity["drift"]:
    shifts = np.cumsum(rng.normal(0, severity["drift"], (nz, 2)), axis=0)
    shifts -= shifts.mean(0)
  image = np.empty((*shape, c), np.uint16)
  out_labels = np.empty(shape, np.uint8)
  for z in range(nz):
    sig = signal[labels[z]] + texture_amp[labels[z]] * texture[z][..., None]
    if pore is not None and severity["shine"]:
      # The pore shows, blurred and fading, the first material behind it.
      seen = np.zeros((ny, nx, c), np.float32)
      open_ = labels[z] == pore
      for d in range(1, behind + 1):
        if z + d >= full[0]:
          break
        here = open_ & (labels[z + d] != pore)
        seen[here] = signal[labels[z + d][here]] * math.exp(-(d - 1) / 1.5)
        open_ &= ~here
      seen = ndimage.gaussian_filter(seen, (2, 2, 0))
      sig += severity["shine"] * seen * (labels[z] == pore)[..., None]
    if blur:
      sig = ndimage.gaussian_filter(sig, (blur, blur, 0))
    if severity["curtaining"]:
      pattern = _curtain_pattern(np.random.default_rng([seed, 1, z // 4]), ny, nx, labels[z], dark)
      sig *= np.maximum(1 + severity["curtaining"] * curtain_depth * pattern[..., None], 0.2)
    if shading is not None:
      sig *= shading[..., None]
    if severity["charging"]:
      sig += _charging(rng, sig.mean(-1), severity["charging"])[..., None]
    noisy = rng.poisson(np.maximum(sig, 0) * dose).astype(np.float32) / dose
    noisy += rng.standard_normal(noisy.shape, dtype=np.float32) * read_noise
    counts = np.clip(np.rint(offset + gain * noisy), 0, 65535).astype(np.uint16)
    lab = labels[z]
    if severity["drift"]:
      dy, dx = np.rint(shifts[z]).astype(int)
      counts = np.roll(counts, (dy, dx), axis=(0, 1))
      lab = np.roll(lab, (dy, dx), axis=(0, 1))
    image[z], out_labels[z] = counts, lab

  params = {
    "seed": int(seed),
    "shape": list(shape),
    "num_classes": k,
    "num_channels": c,
    "anisotropy": round(anisotropy, 3),
    "phases": phases,
    "pore": pore,
    "signal": np.round(signal, 3).tolist(),
    "blur_px": round(blur, 3),
    "dose": np.round(dose, 1).tolist(),
    "read_noise": np.round(read_noise, 4).tolist(),
    "severity": {name: round(v, 3) for name, v in severity.items()},
  }
  return RandomStack(image=image, labels=out_labels, num_classes=k, params=params, seed=int(seed))


def save_figure(seeds: Sequence[int], path: str, shape: Sequence[int] = (4, 192, 192)) -> None:
  """A PNG of random draws: each draw's first detector over its truth, one pair a draw.

  Args:
    seeds: the draws to show (a dozen fit a 4 x 6 grid).
    path: PNG file to write.
    shape: (z, y, x) of each draw; slice 0 is shown.
  """
  from matplotlib.backends.backend_agg import FigureCanvasAgg  # noqa: PLC0415
  from matplotlib.figure import Figure  # noqa: PLC0415

  cols = 6
  rows = 2 * math.ceil(len(seeds) / cols)
  fig = Figure(figsize=(2.2 * cols, 2.3 * rows), dpi=90, layout="constrained")
  FigureCanvasAgg(fig)
  axes = fig.subplots(rows, cols, squeeze=False)
  for ax in axes.ravel():
    ax.set_axis_off()
  for i, seed in enumerate(seeds):
    stack = draw(seed, shape)
    r, col = 2 * (i // cols), i % cols
    img = stack.image[0, :, :, 0].astype(np.float32)
    lo, hi = np.percentile(img, (0.5, 99.5))
    axes[r, col].imshow(img, cmap="gray", vmin=lo, vmax=max(hi, lo + 1), interpolation="nearest")
    kinds = "+".join(p["kind"][:4] for p in stack.params["phases"][1:])
    sev = stack.params["severity"]
    axes[r, col].set_title(
      f"seed {seed}: {stack.num_channels} det, {stack.num_classes} ph\n{kinds}\n"
      f"curt {sev['curtaining']:.2f} shad {sev['shading']:.2f}",
      fontsize=7,
    )
    axes[r + 1, col].imshow(stack.labels[0], cmap="tab10", vmin=0, vmax=9, interpolation="nearest")
  fig.suptitle("domain-randomised FIB-SEM draws (first detector above, truth below)")
  fig.savefig(path, format="png")
