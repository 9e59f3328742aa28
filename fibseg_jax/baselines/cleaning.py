"""Cleaning a FIB-SEM slice the classical way: destripe, flat-field, denoise.

Each step works on one channel [y, x] at a time and keeps its units (detector counts in,
float32 counts out), so a cleaned slice can be written back as a volume and normalised
like a raw one:

  destripe    curtains (streaks along y, the milling direction, within a few degrees)
              removed by the wavelet-FFT filter of Muench et al., Optics Express 17
              (2009) 8567: a 2D wavelet decomposition (`pywt.wavedec2`), the vertical
              detail band of every level Fourier transformed along y and its lowest
              y-frequencies damped with 1 - exp(-k^2 / (2 sigma^2)), then reconstructed.
  flat_field  the non-uniform detector response (occlusion shadow, gain gradient)
              divided out: the image over a heavily blurred copy of itself (computed on
              a block-averaged image, so the blur costs the same at any slice size),
              rescaled to the copy's mean.
  denoise     non-local means (`skimage.restoration.denoise_nl_means`, fast mode), with
              the noise level estimated from the slice (`estimate_sigma`).

`clean_slice` runs the three in that order on every channel; `clean_volume` writes a
cleaned copy of a whole volume (float32, same labels and attributes).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import pywt
from scipy import ndimage
from skimage import restoration, transform

from fibseg_jax.data import volume as volume_lib
from fibseg_jax.progress import Bar


@dataclasses.dataclass(frozen=True)
class CleaningConfig:
  """What `clean_slice` does; a step is skipped when its switch is False.

  The defaults were chosen on the synthetic stacks of `fibseg_jax.data.synth` at 25 nm
  pixels (see BUILD_NOTES.md, "Classical baselines"); nothing in them depends on the
  number of classes or the intensity range.

  Attributes:
    destripe: remove curtains.
    wavelet: wavelet of the destriping decomposition (a `pywt.Wavelet` name).
    levels: decomposition levels (coarser levels catch wider curtains and cost more
      of the real structure); capped at what the slice size allows.
    stripe_sigma: width of the Gaussian damping in Fourier bins of each band.
    flat_field: divide out the slowly varying detector response.
    background_sigma: sigma of the background blur as a fraction of the slice's
      shorter side.
    background_pixels: the background is blurred on an image block-averaged to about
      this many pixels along its shorter side.
    dark: detector counts at zero signal, subtracted before dividing (0: unknown).
    denoise: non-local means denoising.
    patch_size: NLM patch side in pixels.
    patch_distance: NLM search radius in pixels.
    h_factor: NLM filter strength as a multiple of the estimated noise std.
  """

  destripe: bool = True
  wavelet: str = "db10"
  levels: int = 5
  stripe_sigma: float = 3.0
  flat_field: bool = True
  background_sigma: float = 0.3
  background_pixels: int = 256
  dark: float = 0.0
  denoise: bool = True
  patch_size: int = 5
  patch_distance: int = 5
  h_factor: float = 0.8

  def __post_init__(self):
    if self.wavelet not in pywt.wavelist(kind="discrete"):
      raise ValueError(f"cleaning.wavelet={self.wavelet!r} is not a discrete pywt wavelet")
    for name in ("levels", "background_pixels", "patch_size", "patch_distance"):
      if int(getattr(self, name)) < 1:
        raise ValueError(f"cleaning.{name}={getattr(self, name)} must be >= 1")
    for name in ("stripe_sigma", "background_sigma", "h_factor"):
      value = getattr(self, name)
      if not math.isfinite(value) or value <= 0:
        raise ValueError(f"cleaning.{name}={value} must be a positive number")

  def to_json(self) -> dict[str, Any]:
    return dataclasses.asdict(self)

  @classmethod
  def from_json(cls, fields: Mapping[str, Any]) -> CleaningConfig:
    return cls(**dict(fields))


def destripe(channel: np.ndarray, *, wavelet: str = "db10", levels: int = 5, sigma: float = 3.0):
  """Removes streaks that run along y (Muench et al. 2009).

  Args:
    channel: [y, x] one channel of a slice.
    wavelet: pywt wavelet name.
    levels: decomposition levels, capped at `pywt.dwt_max_level` of the shorter side.
    sigma: Gaussian damping width in Fourier bins of each band.

  Returns:
    [y, x] float32.
  """
  image = np.asarray(channel, np.float32)
  levels = max(1, min(int(levels), pywt.dwt_max_level(min(image.shape), wavelet)))
  coeffs = pywt.wavedec2(image, wavelet, level=levels)
  damped = [coeffs[0]]
  for horizontal, vertical, diagonal in coeffs[1:]:
    # Streaks along y are constant in y: they sit in the vertical details at the
    # lowest y-frequencies (checked on the synthetic curtains, BUILD_NOTES.md).
    spectrum = np.fft.rfft(vertical, axis=0)
    k = np.arange(spectrum.shape[0], dtype=np.float32)
    spectrum *= (1.0 - np.exp(-(k**2) / (2.0 * sigma**2)))[:, None]
    vertical = np.fft.irfft(spectrum, n=vertical.shape[0], axis=0).astype(np.float32)
    damped.append((horizontal, vertical, diagonal))
  out = pywt.waverec2(damped, wavelet)
  return np.asarray(out[: image.shape[0], : image.shape[1]], np.float32)


def background(channel: np.ndarray, *, sigma: float = 0.3, pixels: int = 256) -> np.ndarray:
  """The slowly varying background of a channel: a heavy Gaussian blur.

  Args:
    channel: [y, x].
    sigma: blur sigma as a fraction of the shorter side.
    pixels: the blur runs on the image block-averaged to about this many pixels along
      its shorter side, then is interpolated back (linear).

  Returns:
    [y, x] float32, positive where the channel is.
  """
  image = np.asarray(channel, np.float32)
  factor = max(1, min(image.shape) // max(int(pixels), 1))
  small = image
  if factor > 1:
    ny, nx = (s // factor * factor for s in image.shape)
    small = image[:ny, :nx].reshape(ny // factor, factor, nx // factor, factor).mean((1, 3))
  blurred = ndimage.gaussian_filter(small, sigma * min(small.shape), mode="reflect")
  if factor > 1:
    blurred = transform.resize(blurred, image.shape, order=1, mode="edge", anti_aliasing=False)
  return np.asarray(blurred, np.float32)


def flat_field(
  channel: np.ndarray, *, sigma: float = 0.3, pixels: int = 256, dark: float = 0.0
) -> np.ndarray:
  """Divides out the non-uniform detector response.

  Args:
    channel: [y, x] detector counts.
    sigma, pixels: see `background`.
    dark: counts at zero signal, subtracted first (0 when unknown).

  Returns:
    [y, x] float32 counts: (channel - dark) / background * mean(background) + dark.
  """
  image = np.asarray(channel, np.float32) - np.float32(dark)
  bg = background(image, sigma=sigma, pixels=pixels)
  mean = float(bg.mean())
  # Keep the division finite where the background is (near) zero.
  bg = np.maximum(bg, max(abs(mean), 1e-6) * 1e-3)
  return (image / bg * np.float32(mean) + np.float32(dark)).astype(np.float32)


def denoise(
  channel: np.ndarray, *, patch_size: int = 5, patch_distance: int = 5, h_factor: float = 0.8
) -> np.ndarray:
  """Non-local means with the noise std estimated from the channel itself.

  Args:
    channel: [y, x].
    patch_size: patch side in pixels.
    patch_distance: search radius in pixels.
    h_factor: filter strength in units of the estimated noise std.

  Returns:
    [y, x] float32.
  """
  image = np.asarray(channel, np.float32)
  sigma = float(restoration.estimate_sigma(image))
  if sigma <= 0:
    return image.copy()
  out = restoration.denoise_nl_means(
    image,
    patch_size=patch_size,
    patch_distance=patch_distance,
    h=h_factor * sigma,
    sigma=sigma,
    fast_mode=True,
    preserve_range=True,
  )
  return np.asarray(out, np.float32)


def clean_slice(image: np.ndarray, config: CleaningConfig = CleaningConfig()) -> np.ndarray:
  """Destripes, flat-fields and denoises every channel of a slice.

  Args:
    image: [y, x, channels] (or [y, x]) detector counts, any real dtype.
    config: which steps, with what settings.

  Returns:
    float32 of the same shape, in the same units.
  """
  image = np.asarray(image)
  squeeze = image.ndim == 2
  channels = image[..., None] if squeeze else image
  out = np.empty(channels.shape, np.float32)
  for c in range(channels.shape[-1]):
    x = channels[..., c].astype(np.float32)
    if config.destripe:
      x = destripe(x, wavelet=config.wavelet, levels=config.levels, sigma=config.stripe_sigma)
    if config.flat_field:
      x = flat_field(
        x, sigma=config.background_sigma, pixels=config.background_pixels, dark=config.dark
      )
    if config.denoise:
      x = denoise(
        x,
        patch_size=config.patch_size,
        patch_distance=config.patch_distance,
        h_factor=config.h_factor,
      )
    out[..., c] = x
  return out[..., 0] if squeeze else out


def clean_volume(
  source: volume_lib.Volume | Any,
  output: Any,
  config: CleaningConfig = CleaningConfig(),
  *,
  overwrite: bool = False,
  progress: bool = False,
  slice_fn: Callable[[np.ndarray], np.ndarray] | None = None,
) -> volume_lib.VolumeMetadata:
  """Writes a cleaned copy of a volume: every slice through `clean_slice`, float32.

  Labels, classes, channels and voxel size are copied; the copy records the cleaning
  in its attribute `cleaning` (with the source) and gets its own intensity statistics.

  Args:
    source: an opened volume or its root.
    output: root of the new volume (local path, ``memory://name``, ...).
    config: the cleaning settings.
    overwrite: replace an existing output.
    progress: show a progress bar.
    slice_fn: replaces `clean_slice(image, config)` ([y, x, c] -> [y, x, c] float32).

  Returns:
    The metadata of the committed volume.

  Raises:
    volume_lib.VolumeError: the source cannot be opened or the output exists.
  """
  vol = source if isinstance(source, volume_lib.Volume) else volume_lib.open_volume(source)
  clean = slice_fn or (lambda image: clean_slice(image, config))
  annotated = set(vol.metadata.annotated_slices)
  with volume_lib.create_volume(
    output,
    shape=vol.shape,
    dtype="float32",
    channels=vol.channels,
    classes=vol.classes,
    voxel_size_nm=vol.metadata.voxel_size_nm,
    overwrite=overwrite,
  ) as writer:
    for z in Bar(range(vol.shape[0]), desc="clean", unit="slice", disable=not progress):
      labels = vol.read_labels(z) if z in annotated else None
      writer.write_slice(z, clean(vol.read_image(z)), labels)
    return writer.commit(
      extra_attrs={"cleaning": {"source": volume_lib.describe(vol.root), **config.to_json()}}
    )
