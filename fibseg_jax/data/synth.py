"""Synthetic PFIB-SEM serial-section stacks of hydrated cement paste, with known truth.

A 3D phantom of four phases (pore, C-S-H, portlandite, unhydrated clinker) is built in
physical units from smooth Gaussian random fields, so anisotropic voxels give the right
shapes. Each slice is rendered into two detector signals with different phase contrast
(ICE: C-S-H and portlandite nearly equal, clinker bright; TLD: C-S-H and portlandite
apart, portlandite and clinker nearly equal), so neither signal alone separates every
phase. The artifacts of a Xe-PFIB run are then added, each scaled by a severity where 0
turns it off and 1 is the default strength:

  shine_through  pores show, blurred and attenuated, the material lying behind them,
                 which later slices reveal (the pore labels stay "pore").
  curtaining     streaks along the milling direction (y, top to bottom) at angles of a
                 few degrees, strongest below pores and clinker grains, drifting slowly
                 from slice to slice.
  shading        non-uniform detector response: an occlusion shadow from the trench wall
                 (x = 0) and a gain gradient down the face, both growing as the trench
                 deepens (with z).
  noise          Poisson shot noise and Gaussian read noise; ICE is the noisier signal.

Order of rendering: phase signal and texture, beam blur, shine-through, curtaining,
shading, noise, then uint16 counts with a per-detector offset and gain, so the stored
values span a realistic sub-range and normalisation from stored statistics matters.
Everything is deterministic per seed, and the phantom does not depend on the
severities: two configs that differ only in severities image the same sample.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import statistics
from collections.abc import Sequence
from typing import Any, NamedTuple

import numpy as np
import tifffile
from scipy import ndimage

from fibseg_jax import outputs
from fibseg_jax.data import palette
from fibseg_jax.data import volume as volume_lib
from fibseg_jax.progress import Bar

CLASSES = ("pore", "csh", "portlandite", "clinker")
CHANNELS = ("ICE", "TLD")
PORE, CSH, PORTLANDITE, CLINKER = range(len(CLASSES))
# Class colours (RGB in 0..1), one per class: the viewer palette's, by name.
CLASS_COLORS = tuple(palette.class_color(c) for c in CLASSES)

# Mean detector signal of each phase, [class, channel] as a fraction of the detector range.
# ICE confuses C-S-H with portlandite (0.07 apart, under noise of ~0.08); TLD confuses
# portlandite with clinker (0.06 apart); together every pair is at least 0.07 apart in
# one signal and their joint distance is >= 0.13.
PHASE_SIGNAL = np.array(
  [
    [0.08, 0.10],  # pore
    [0.45, 0.40],  # csh
    [0.52, 0.68],  # portlandite
    [0.85, 0.74],  # clinker
  ],
  np.float32,
)
# Intrinsic within-phase texture (std of a smooth field), [class, channel]: small next to
# the phase contrast, so with every artifact off the phases separate cleanly.
TEXTURE_AMPLITUDE = np.array(
  [
    [0.006, 0.006],
    [0.015, 0.012],
    [0.008, 0.010],
    [0.020, 0.015],
  ],
  np.float32,
)
# Stored counts = offset + gain * signal; realistic sub-ranges of uint16.
DETECTOR_OFFSET = np.array([1400.0, 2600.0], np.float32)
DETECTOR_GAIN = np.array([21000.0, 18000.0], np.float32)
# Electrons per pixel at signal 1 (shot noise) and read noise std, at severity 1.
DETECTOR_DOSE = np.array([60.0, 400.0], np.float32)
READ_NOISE = np.array([0.025, 0.010], np.float32)
# Relative curtain modulation per detector; the TLD sees more topography.
CURTAIN_DEPTH = np.array([0.12, 0.20], np.float32)
# Occlusion shadow depth and gain slope at full trench depth; the ICE sits to the side.
SHADOW_DEPTH = np.array([0.55, 0.30], np.float32)
SHADOW_WIDTH = 0.25  # e-folding width of the shadow as a fraction of the field of view
GAIN_SLOPE = np.array([0.20, 0.30], np.float32)

# Phantom length scales (nm; Gaussian field sigma) and target volume fractions.
CLINKER_SIGMA_NM = 700.0
CLINKER_ROUGHNESS_SIGMA_NM = 150.0
PORTLANDITE_SIGMA_NM = 450.0
LARGE_PORE_SIGMA_NM = 350.0
CAPILLARY_SIGMA_NM = 250.0
SMALL_PORE_SIGMA_NM = 120.0
TEXTURE_SIGMA_NM = 200.0
CLINKER_FRACTION = 0.15
PORTLANDITE_FRACTION = 0.15  # of the whole volume
# Pores: large blobs, a connected capillary network (where two fields are both near
# zero, i.e. along the curves where two level sets cross) and small isolated pores.
LARGE_PORE_FRACTION = 0.06
CAPILLARY_HALF_WIDTH = 0.25
SMALL_PORE_FRACTION = 0.03
BEAM_SIGMA_NM = 20.0
# Shine-through: material k slices behind a pore shows with weight
# SHINE_GAIN * exp(-(k - 1) dz / SHINE_ATTENUATION_NM), blurred by SHINE_BLUR_NM.
SHINE_GAIN = 0.6
SHINE_ATTENUATION_NM = 120.0
SHINE_BLUR_NM = 60.0
# Curtains: a few layers of straight grooves, each with its own angle and region.
CURTAIN_LAYERS = 3
CURTAIN_MAX_ANGLE_DEG = 4.0
CURTAIN_ANGLE_DRIFT_DEG_PER_UM = 1.0
CURTAIN_SHIFT_DRIFT = 0.05  # nm of sideways drift per nm of milling depth
CURTAIN_EVOLVE_NM = 1500.0  # depth over which a groove profile is replaced by a new one
CURTAIN_GROOVE_SIGMA_NM = (40.0, 120.0)
CURTAIN_REGION_SIGMA_NM = 1500.0
CURTAIN_TRAIL_NM = 1500.0  # how far below a pore or grain its curtain fades
CURTAIN_BASE_STRENGTH = 0.5  # relative groove depth away from obstacles
CURTAIN_TRAIL_STRENGTH = 1.25  # ... and right below a pore or grain

# Fixed random streams, so changing one severity never changes another component.
_STREAM_PHANTOM, _STREAM_TEXTURE, _STREAM_CURTAIN, _STREAM_NOISE = range(4)
_BLOCK_VOXELS = 1 << 23  # voxels per z-block of field evaluation (32 MiB per float32 field)


@dataclasses.dataclass(frozen=True)
class SynthConfig:
  """What to generate.

  Attributes:
    shape: (z, y, x) in voxels.
    voxel_size_nm: (z, y, x) voxel size in nanometres; z is the slice thickness.
    seed: random seed; the same config always gives the same stack.
    curtaining: severity of milling curtains (0 = off, 1 = default).
    shading: severity of the occlusion shadow and gain gradient.
    noise: severity of shot and read noise (noise std scales linearly).
    shine_through: severity of pore shine-through.
    drift: growth of the curtaining, shading, noise and shine-through severities along
      z: slice z gets each severity x (1 + drift * z / (depth - 1)), so the last slice
      of a stack with drift 1 has twice the first one's artifacts (0 = no drift). A
      stack whose slices differ, to test which slice to annotate next.
  """

  shape: tuple[int, int, int] = (16, 512, 512)
  voxel_size_nm: tuple[float, float, float] = (50.0, 25.0, 25.0)
  seed: int = 0
  curtaining: float = 1.0
  shading: float = 1.0
  noise: float = 1.0
  shine_through: float = 1.0
  drift: float = 0.0

  def __post_init__(self):
    shape = tuple(self.shape)
    if len(shape) != 3 or not all(isinstance(s, (int, np.integer)) for s in shape):
      raise ValueError(f"shape must be 3 integers z,y,x, got {self.shape}")
    if shape[0] < 1 or shape[1] < 8 or shape[2] < 8:
      raise ValueError(f"shape must have z >= 1 and y, x >= 8, got {list(shape)}")
    voxel = tuple(float(v) for v in self.voxel_size_nm)
    if len(voxel) != 3 or not all(math.isfinite(v) and v > 0 for v in voxel):
      raise ValueError(f"voxel_size_nm must be 3 positive numbers z,y,x, got {self.voxel_size_nm}")
    if not isinstance(self.seed, (int, np.integer)) or self.seed < 0:
      raise ValueError(f"seed must be a non-negative integer, got {self.seed!r}")
    for name in ("curtaining", "shading", "noise", "shine_through", "drift"):
      value = getattr(self, name)
      if not math.isfinite(value) or value < 0:
        raise ValueError(f"{name} must be a number >= 0 (0 = off, 1 = default), got {value}")
    object.__setattr__(self, "shape", tuple(int(s) for s in shape))
    object.__setattr__(self, "voxel_size_nm", voxel)
    object.__setattr__(self, "seed", int(self.seed))

  def to_json(self) -> dict[str, Any]:
    fields = dataclasses.asdict(self)
    if not self.drift:  # stacks without drift keep the metadata they always had
      del fields["drift"]
    return {k: list(v) if isinstance(v, tuple) else v for k, v in fields.items()}

  def at_slice(self, z: int) -> SynthConfig:
    """The config whose severities slice `z` is rendered with (`drift` applied)."""
    if not self.drift:
      return self
    scale = 1 + self.drift * z / max(self.shape[0] - 1, 1)
    names = ("curtaining", "shading", "noise", "shine_through")
    return dataclasses.replace(self, **{n: getattr(self, n) * scale for n in names})


@dataclasses.dataclass(frozen=True)
class SynthStack:
  """A generated stack.

  Attributes:
    image: [z, y, x, channel] uint16 detector counts; channel order as `channels`.
    labels: [z, y, x] uint8 truth for every voxel, values index `classes`.
    channels: detector names, ("ICE", "TLD").
    classes: phase names, `CLASSES`.
    voxel_size_nm: (z, y, x).
    config: the config that generated it.
  """

  image: np.ndarray
  labels: np.ndarray
  channels: tuple[str, ...]
  classes: tuple[str, ...]
  voxel_size_nm: tuple[float, float, float]
  config: SynthConfig


# --- smooth random fields ---------------------------------------------------------------


def _lattice_weights(n: int, sigma: float) -> np.ndarray:
  """[n, nodes] Gaussian weights from lattice nodes (spacing sigma) to n voxels.

  A sum of Gaussians of width sigma on a lattice of spacing sigma is stationary to
  within ~1e-4, and each row is normalised so the field has unit variance at every voxel.
  """
  sigma = max(sigma, 0.5)
  nodes = np.arange(-3 * sigma, n - 1 + 3 * sigma + sigma, sigma)
  w = np.exp(-0.5 * ((np.arange(n)[:, None] - nodes[None, :]) / sigma) ** 2)
  w /= np.linalg.norm(w, axis=1, keepdims=True)
  return w.astype(np.float32)


class SmoothField:
  """A unit-variance Gaussian random field with Gaussian correlation, sigma in nm.

  Lattice noise is drawn once; any z-block is evaluated exactly by separable matrix
  products, so blocks agree where they meet and memory stays at one block.
  """

  def __init__(
    self,
    rng: np.random.Generator,
    shape: Sequence[int],
    voxel_size_nm: Sequence[float],
    sigma_nm: float,
  ):
    self._w = [_lattice_weights(n, sigma_nm / v) for n, v in zip(shape, voxel_size_nm, strict=True)]
    self._noise = rng.standard_normal([w.shape[1] for w in self._w], dtype=np.float32)

  def block(self, z0: int, z1: int) -> np.ndarray:
    """Returns the field on slices z0..z1-1: [z1 - z0, y, x] float32."""
    wz, wy, wx = self._w
    t = np.tensordot(wz[z0:z1], self._noise, axes=1)  # [bz, ny, nx]
    return np.matmul(np.matmul(wy, t), wx.T)


def _upper_quantile(fraction: float) -> float:
  """Threshold t with P(N(0, 1) > t) = fraction."""
  return statistics.NormalDist().inv_cdf(1.0 - fraction)


# --- phantom ----------------------------------------------------------------------------


def shine_lookahead(voxel_size_nm: Sequence[float]) -> int:
  """Hidden slices rendered past the end of the stack, for pores near its end to show.

  Depends on the voxel size only, so the phantom never depends on a severity.
  """
  return int(math.ceil(4 * SHINE_ATTENUATION_NM / voxel_size_nm[0])) + 1


def _block_size(shape: Sequence[int]) -> int:
  return max(1, _BLOCK_VOXELS // (shape[1] * shape[2]))


def phantom_labels(
  shape: Sequence[int], voxel_size_nm: Sequence[float], seed: int, progress: bool = False
) -> np.ndarray:
  """The phase of every voxel of a cement-paste phantom.

  Args:
    shape: (z, y, x) in voxels.
    voxel_size_nm: (z, y, x) in nm.
    seed: random seed.
    progress: show a progress bar over z-blocks.

  Returns:
    [z, y, x] uint8 labels indexing `CLASSES`.
  """
  rng = np.random.default_rng([seed, _STREAM_PHANTOM])
  field = lambda sigma: SmoothField(rng, shape, voxel_size_nm, sigma)
  clinker, roughness = field(CLINKER_SIGMA_NM), field(CLINKER_ROUGHNESS_SIGMA_NM)
  portlandite = field(PORTLANDITE_SIGMA_NM)
  large_pore, small_pore = field(LARGE_PORE_SIGMA_NM), field(SMALL_PORE_SIGMA_NM)
  capillary_a, capillary_b = field(CAPILLARY_SIGMA_NM), field(CAPILLARY_SIGMA_NM)
  t_clinker = _upper_quantile(CLINKER_FRACTION)
  # Phases are assigned clinker > portlandite > pore > C-S-H, so later fractions are
  # of what is left.
  t_portlandite = _upper_quantile(PORTLANDITE_FRACTION / (1 - CLINKER_FRACTION))
  t_large, t_small = _upper_quantile(LARGE_PORE_FRACTION), _upper_quantile(SMALL_PORE_FRACTION)
  labels = np.empty(shape, np.uint8)
  step = _block_size(shape)
  for z0 in Bar(range(0, shape[0], step), desc="phantom", unit="block", disable=not progress):
    z1 = min(z0 + step, shape[0])
    rough = 0.35
    grains = (clinker.block(z0, z1) + rough * roughness.block(z0, z1)) / math.hypot(1, rough)
    pores = large_pore.block(z0, z1) > t_large
    pores |= small_pore.block(z0, z1) > t_small
    pores |= (np.abs(capillary_a.block(z0, z1)) < CAPILLARY_HALF_WIDTH) & (
      np.abs(capillary_b.block(z0, z1)) < CAPILLARY_HALF_WIDTH
    )
    block = np.full((z1 - z0, *shape[1:]), CSH, np.uint8)
    block[pores] = PORE
    block[portlandite.block(z0, z1) > t_portlandite] = PORTLANDITE
    block[grains > t_clinker] = CLINKER
    labels[z0:z1] = block
  return labels


# --- artifacts --------------------------------------------------------------------------


def _periodic_profile(rng: np.random.Generator, n: int, step_nm: float) -> np.ndarray:
  """[n] groove-depth profile along the curtain-normal axis: unit std, spiky grooves."""
  freq = np.fft.rfftfreq(n, d=step_nm)
  spectrum = np.zeros(freq.shape, np.float64)
  for sigma in CURTAIN_GROOVE_SIGMA_NM:
    spectrum += np.exp(-0.5 * (2 * np.pi * freq * sigma) ** 2) * sigma
  noise = np.fft.rfft(rng.standard_normal(n))
  profile = np.fft.irfft(noise * spectrum, n)
  profile /= profile.std()
  # A few deep grooves over a calm background, as Xe curtains look.
  profile = np.sign(profile) * np.abs(profile) ** 1.5
  return (profile / profile.std()).astype(np.float32)


def _exponential_trail(mask: np.ndarray, decay: float, chunk: int = 128) -> np.ndarray:
  """trail[y] = (1 - decay) * sum_{k <= y} decay**(y - k) * mask[k], along axis 0.

  Args:
    mask: [y, x] bool.
    decay: per-row decay factor in (0, 1).
    chunk: rows per vectorised step; keeps decay**-chunk small so the sums stay exact.

  Returns:
    [y, x] float32 in [0, 1]: 1 inside long runs of the mask, fading below them.
  """
  out = np.empty(mask.shape, np.float64)
  carry = np.zeros(mask.shape[1:], np.float64)
  for y0 in range(0, mask.shape[0], chunk):
    rows = mask[y0 : y0 + chunk].astype(np.float64)
    powers = decay ** np.arange(1, len(rows) + 1, dtype=np.float64)[:, None]
    # Within a chunk the recursion is a cumulative sum in rescaled units.
    out[y0 : y0 + chunk] = powers * (carry + (1 - decay) * np.cumsum(rows / powers, axis=0))
    carry = out[y0 + len(rows) - 1]
  return out.astype(np.float32)


class _CurtainLayer(NamedTuple):
  """One family of parallel grooves."""

  angle_deg: float  # from the milling direction (y), at the top of the stack
  angle_rate_deg_per_um: float  # change of angle per um of milling depth
  shift_rate: float  # sideways drift, nm per nm of milling depth
  offset_nm: float
  profiles: tuple[np.ndarray, np.ndarray]  # [n] groove profiles it evolves between
  region: SmoothField  # where on the face this layer shows


class _Curtains:
  """Curtain pattern of each slice: layers of tilted grooves that drift slowly with z."""

  def __init__(self, config: SynthConfig):
    rng = np.random.default_rng([config.seed, _STREAM_CURTAIN])
    nz, ny, nx = config.shape
    dz, dy, dx = config.voxel_size_nm
    self._dz = dz
    self._y_nm = (np.arange(ny, dtype=np.float32) * dy)[:, None]
    self._x_nm = (np.arange(nx, dtype=np.float32) * dx)[None, :]
    # Periodic profiles longer than any path across the field, so no groove repeats.
    self._step = dx / 2
    self._period = 2 * (nx * dx + ny * dy) + 2 * CURTAIN_SHIFT_DRIFT * nz * dz
    n = int(math.ceil(self._period / self._step))
    self._period = n * self._step
    self._grid = np.arange(n, dtype=np.float32) * self._step
    self._layers = [
      _CurtainLayer(
        angle_deg=rng.uniform(-CURTAIN_MAX_ANGLE_DEG, CURTAIN_MAX_ANGLE_DEG),
        angle_rate_deg_per_um=rng.uniform(-1, 1) * CURTAIN_ANGLE_DRIFT_DEG_PER_UM,
        shift_rate=rng.uniform(-1, 1) * CURTAIN_SHIFT_DRIFT,
        offset_nm=rng.uniform(0, self._period),
        profiles=(_periodic_profile(rng, n, self._step), _periodic_profile(rng, n, self._step)),
        region=SmoothField(rng, config.shape, config.voxel_size_nm, CURTAIN_REGION_SIGMA_NM),
      )
      for _ in range(CURTAIN_LAYERS)
    ]
    self._trail = math.exp(-dy / CURTAIN_TRAIL_NM)

  def pattern(self, z: int, labels: np.ndarray) -> np.ndarray:
    """Relative curtain modulation of slice z, [y, x] float32, about unit std at strength 1.

    Args:
      z: slice index.
      labels: [y, x] phases of the slice; curtains trail below pores and clinker.
    """
    depth = z * self._dz
    total = np.zeros(labels.shape, np.float32)
    norm = np.zeros(labels.shape, np.float32)
    for layer in self._layers:
      angle = math.radians(layer.angle_deg + layer.angle_rate_deg_per_um * depth / 1000)
      u = (
        self._x_nm * math.cos(angle)
        + self._y_nm * math.sin(angle)
        + layer.offset_nm
        + layer.shift_rate * depth
      )
      # The groove profile slowly turns into another one as the milling goes deeper.
      phase = 0.5 * math.pi * depth / CURTAIN_EVOLVE_NM
      profile = math.cos(phase) * layer.profiles[0] + math.sin(phase) * layer.profiles[1]
      # Each layer dominates its own slowly varying region of the face.
      weight = 1 / (1 + np.exp(-2 * layer.region.block(z, z + 1)[0]))
      total += weight * np.interp(u, self._grid, profile, period=self._period)
      norm += weight * weight
    curtain = total / np.sqrt(norm)
    # Milling rate jumps at pores and hard grains start grooves that trail downwards
    # (+y), fading over CURTAIN_TRAIL_NM.
    obstacle = np.isin(labels, (PORE, CLINKER))
    trail = _exponential_trail(obstacle, self._trail)
    strength = CURTAIN_BASE_STRENGTH + (CURTAIN_TRAIL_STRENGTH - CURTAIN_BASE_STRENGTH) * trail
    return (curtain * strength).astype(np.float32)


def detector_response(shape: Sequence[int], z: int, severity: float) -> np.ndarray:
  """Multiplicative detector response of slice z: [y, x, channel] float32.

  An occlusion shadow from the trench wall at x = 0 and a gain that falls down the face
  (+y). The stack spans the milling run, so both grow from half to full strength from
  the first to the last slice.

  Args:
    shape: (z, y, x) of the stack.
    z: slice index.
    severity: 0 gives 1 everywhere.
  """
  nz, ny, nx = shape
  depth = 0.5 + 0.5 * (z / (nz - 1) if nz > 1 else 1.0)
  yf = np.linspace(0, 1, ny, dtype=np.float32)[:, None, None]
  xf = np.linspace(0, 1, nx, dtype=np.float32)[None, :, None]
  shadow = SHADOW_DEPTH * depth * np.exp(-xf / (SHADOW_WIDTH * depth)) * (0.5 + 0.5 * yf)
  gain = 1 - GAIN_SLOPE * depth * yf
  response = 1 - severity * (1 - gain * (1 - shadow))
  return np.maximum(response, 0.05).astype(np.float32)


# --- rendering --------------------------------------------------------------------------


def _render_slice(
  config: SynthConfig,
  z: int,
  labels: np.ndarray,
  texture: np.ndarray,
  behind: np.ndarray,
  behind_depth: np.ndarray,
  curtains: _Curtains,
) -> np.ndarray:
  """Detector counts of one slice: [y, x, channel] uint16."""
  config = config.at_slice(z)
  dz, dy, dx = config.voxel_size_nm
  sig = PHASE_SIGNAL[labels] + TEXTURE_AMPLITUDE[labels] * texture[..., None]
  sig = ndimage.gaussian_filter(sig, (BEAM_SIGMA_NM / dy, BEAM_SIGMA_NM / dx, 0))
  if config.shine_through > 0:
    pore = labels == PORE
    weight = SHINE_GAIN * np.exp(-(behind_depth.astype(np.float32) - 1) * dz / SHINE_ATTENUATION_NM)
    seen = (PHASE_SIGNAL[behind] - PHASE_SIGNAL[PORE]) * (weight * pore)[..., None]
    seen = ndimage.gaussian_filter(seen, (SHINE_BLUR_NM / dy, SHINE_BLUR_NM / dx, 0))
    sig += config.shine_through * seen * pore[..., None]
  if config.curtaining > 0:
    modulation = config.curtaining * CURTAIN_DEPTH * curtains.pattern(z, labels)[..., None]
    sig *= np.maximum(1 + modulation, 0.2)
  if config.shading > 0:
    sig *= detector_response(config.shape, z, config.shading)
  if config.noise > 0:
    rng = np.random.default_rng([config.seed, _STREAM_NOISE, z])
    dose = DETECTOR_DOSE / config.noise**2
    sig = rng.poisson(np.maximum(sig, 0) * dose).astype(np.float32) / dose
    sig += rng.standard_normal(sig.shape, dtype=np.float32) * (READ_NOISE * config.noise)
  counts = np.rint(DETECTOR_OFFSET + DETECTOR_GAIN * sig)
  return np.clip(counts, 0, 65535).astype(np.uint16)


def generate(config: SynthConfig, progress: bool = False) -> SynthStack:
  """Generates a synthetic dual-detector stack with its truth.

  Args:
    config: what to generate.
    progress: show progress bars.

  Returns:
    The stack: image [z, y, x, channel] uint16, labels [z, y, x] uint8.
  """
  nz, ny, nx = config.shape
  lookahead = shine_lookahead(config.voxel_size_nm)
  # Slices past the end are rendered only as the material that pores near the end show.
  labels = phantom_labels((nz + lookahead, ny, nx), config.voxel_size_nm, config.seed, progress)
  texture = SmoothField(
    np.random.default_rng([config.seed, _STREAM_TEXTURE]),
    config.shape,
    config.voxel_size_nm,
    TEXTURE_SIGMA_NM,
  )
  curtains = _Curtains(config)
  # For each pore voxel: the first non-pore phase behind it (+z) and how many slices on.
  # A pore still open at the end of the lookahead shows nothing (behind = pore).
  behind = labels[-1].copy()
  behind_depth = np.zeros((ny, nx), np.int32)
  for z in range(nz + lookahead - 2, nz - 1, -1):
    behind, behind_depth = _step_behind(labels[z], behind, behind_depth)
  image = np.empty((nz, ny, nx, len(CHANNELS)), np.uint16)
  step = _block_size(config.shape)
  with Bar(total=nz, desc="render", unit="slice", disable=not progress) as bar:
    # Back to front, carrying what lies behind each pore.
    for z0 in reversed(range(0, nz, step)):
      z1 = min(z0 + step, nz)
      tex = texture.block(z0, z1)
      for z in reversed(range(z0, z1)):
        behind, behind_depth = _step_behind(labels[z], behind, behind_depth)
        image[z] = _render_slice(config, z, labels[z], tex[z - z0], behind, behind_depth, curtains)
        bar.update(1)
  return SynthStack(
    image=image,
    labels=labels[:nz].copy(),
    channels=CHANNELS,
    classes=CLASSES,
    voxel_size_nm=config.voxel_size_nm,
    config=config,
  )


def _step_behind(
  labels: np.ndarray, behind: np.ndarray, depth: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
  """Moves the what-lies-behind state one slice towards the surface."""
  pore = labels == PORE
  return np.where(pore, behind, labels), np.where(pore, np.minimum(depth + 1, 10_000), 0)


# --- output -----------------------------------------------------------------------------


def check_annotated(annotate: Sequence[int], num_slices: int) -> tuple[int, ...]:
  """Sorted unique annotated slice indices, checked against the stack depth.

  Raises:
    ValueError: an index outside 0..num_slices-1.
  """
  bad = [z for z in annotate if not 0 <= int(z) < num_slices]
  if bad:
    raise ValueError(
      f"annotate: slice index(es) {bad} outside the stack; expected 0..{num_slices - 1}"
    )
  return tuple(sorted({int(z) for z in annotate}))


TIFF_FOLDERS_KIND = "synthetic stack"


def _is_tiff_folders(path: str) -> bool:
  """Whether `path` holds a stack `write_tiff_folders` wrote (its stack.json says so)."""
  try:
    with open(os.path.join(path, "stack.json")) as f:
      return "synthetic" in json.load(f)
  except (OSError, ValueError, TypeError):
    return False


def check_destination(path: str, *, tiff: bool, overwrite: bool) -> None:
  """Checks, before generating, that `write_tiff_folders` (`tiff`) or `write_volume` may
  write at the local `path` (see `fibseg_jax.outputs`).

  Raises:
    ValueError: naming --out and what is there.
  """
  try:
    outputs.claim(
      os.path.abspath(path),
      kind=TIFF_FOLDERS_KIND if tiff else "volume",
      flag="--out",
      overwrite=overwrite,
      is_own=_is_tiff_folders if tiff else volume_lib.is_volume,
    )
  except outputs.OutputError as e:
    raise ValueError(str(e)) from e


def _prepare_destination(path: str, overwrite: bool) -> str:
  """A hidden temporary sibling of `path` to write into, after claiming `path` (only an
  earlier synthetic stack is replaced; see `fibseg_jax.outputs`)."""
  path = os.path.abspath(path)
  try:
    outputs.claim(
      path, kind=TIFF_FOLDERS_KIND, flag="--out", overwrite=overwrite, is_own=_is_tiff_folders
    )
  except outputs.OutputError as e:
    raise ValueError(str(e)) from e
  outputs.remove_stale_partials(path)
  tmp = outputs.partial_sibling(path)
  os.mkdir(tmp)
  return tmp


def write_tiff_folders(
  stack: SynthStack,
  out_dir: str | os.PathLike,
  annotate: Sequence[int],
  overwrite: bool = False,
  progress: bool = False,
) -> str:
  """Writes the stack as an instrument would: one folder of uint16 TIFF slices per detector.

  Layout: `out_dir/ICE/slice_0000.tif`, `out_dir/TLD/slice_0000.tif`, ... and
  `out_dir/labels/slice_0003.tif` (uint8 class indices) only for the annotated slices,
  plus `out_dir/stack.json` with classes, channels, voxel size and the config. File names
  end with the slice number, which is how `fibseg_jax.data.ingest` orders and matches
  them. Written to a temporary sibling and renamed into place, so a failure leaves nothing.

  Args:
    stack: what to write.
    out_dir: destination directory; must not exist unless `overwrite`.
    annotate: slice indices whose labels are written.
    overwrite: replace an existing `out_dir`.
    progress: show a progress bar.

  Returns:
    The absolute path written.

  Raises:
    ValueError: `out_dir` exists without `overwrite`, its parent is missing, or an
      annotated index is outside the stack.
  """
  nz = stack.image.shape[0]
  annotated = check_annotated(annotate, nz)
  final = os.path.abspath(os.fspath(out_dir))
  tmp = _prepare_destination(final, overwrite)
  try:
    for name in (*stack.channels, "labels"):
      os.mkdir(os.path.join(tmp, name))
    digits = max(4, len(str(nz - 1)))
    for z in Bar(range(nz), desc="tiff", unit="slice", disable=not progress):
      filename = f"slice_{z:0{digits}d}.tif"
      for c, name in enumerate(stack.channels):
        tifffile.imwrite(os.path.join(tmp, name, filename), stack.image[z, :, :, c])
      if z in annotated:
        tifffile.imwrite(os.path.join(tmp, "labels", filename), stack.labels[z])
    info = {
      "channels": list(stack.channels),
      "classes": list(stack.classes),
      "voxel_size_nm": list(stack.voxel_size_nm),
      "annotated_slices": list(annotated),
      "synthetic": stack.config.to_json(),
    }
    with open(os.path.join(tmp, "stack.json"), "w") as f:
      json.dump(info, f, indent=1)
    outputs.replace(tmp, final)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  return final


def write_volume(
  stack: SynthStack,
  root: str | os.PathLike,
  annotate: Sequence[int],
  overwrite: bool = False,
  progress: bool = False,
) -> volume_lib.VolumeMetadata:
  """Writes the stack as a volume (see `fibseg_jax.data.volume`), labels only where annotated.

  Args:
    stack: what to write.
    root: volume root (local path, ``memory://name``, ...).
    annotate: slice indices whose labels are stored; the rest read as 255 (not annotated).
    overwrite: replace an existing volume.
    progress: show a progress bar.

  Returns:
    The metadata of the committed volume.

  Raises:
    ValueError: an annotated index is outside the stack, or `volume.VolumeError` (a
      ValueError) when the root exists without `overwrite`.
  """
  nz = stack.image.shape[0]
  annotated = check_annotated(annotate, nz)
  with volume_lib.create_volume(
    root,
    shape=stack.labels.shape,
    dtype="uint16",
    channels=stack.channels,
    classes=stack.classes,
    voxel_size_nm=stack.voxel_size_nm,
    overwrite=overwrite,
  ) as writer:
    for z in Bar(range(nz), desc="volume", unit="slice", disable=not progress):
      writer.write_slice(z, stack.image[z], stack.labels[z] if z in annotated else None)
    return writer.commit(extra_attrs={"synthetic": stack.config.to_json()})


def save_preview(
  stack: SynthStack, z: int, path: str | os.PathLike, *, name: str | None = None
) -> None:
  """Saves a PNG of slice z: ICE | TLD | truth, with a class legend, a scale bar and a
  title naming the stack, the slice and the voxel size.

  Args:
    stack: the stack.
    z: slice index.
    path: PNG file to write.
    name: what to call the stack in the title (e.g. where it was written); default
      "synthetic cement paste, seed N".

  Raises:
    ValueError: z outside the stack.
  """
  # Figure + Agg canvas directly, so no global matplotlib backend is touched.
  from matplotlib.backends.backend_agg import FigureCanvasAgg
  from matplotlib.figure import Figure
  from matplotlib.patches import Patch

  nz, ny, nx = stack.labels.shape
  if not 0 <= z < nz:
    raise ValueError(f"preview slice {z} outside the stack; expected 0..{nz - 1}")
  fig = Figure(figsize=(15, 4.9 * ny / nx + 0.8), dpi=100, layout="constrained")
  FigureCanvasAgg(fig)
  axes = fig.subplots(1, 3)
  for c, ax in enumerate(axes[:2]):
    img = stack.image[z, :, :, c].astype(np.float32)
    lo, hi = np.percentile(img, (0.5, 99.5))
    ax.imshow(img, cmap="gray", vmin=lo, vmax=max(hi, lo + 1), interpolation="nearest")
    ax.set_title(f"{stack.channels[c]} detector")
  n = len(stack.classes)
  axes[2].imshow(
    stack.labels[z],
    cmap=palette.class_colormap(stack.classes),
    vmin=-0.5,
    vmax=n - 0.5,
    interpolation="nearest",
  )
  axes[2].set_title("truth")
  colors = palette.class_colors(stack.classes)
  axes[2].legend(
    handles=[Patch(color=colors[i], label=c) for i, c in enumerate(stack.classes)],
    loc="upper left",
    bbox_to_anchor=(1.02, 1.0),  # beside the panel, not over the truth
    fontsize=8,
    frameon=False,
  )
  palette.add_scale_bar(axes[0], stack.voxel_size_nm[2], nx)
  for ax in axes:
    ax.set_xticks([])
    ax.set_yticks([])
  voxel = " x ".join(f"{v:g}" for v in stack.voxel_size_nm)
  fig.suptitle(
    f"{name or f'synthetic cement paste, seed {stack.config.seed}'}: slice {z} of "
    f"0-{nz - 1}; voxel {voxel} nm [z, y, x]"
  )
  fig.savefig(os.fspath(path), format="png")
