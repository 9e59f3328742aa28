"""What the slab loader reads and how it augments: `LoaderConfig` and the recipe's parts.

Its own module so that `plans` (which draws patches from a config) and `loader` (which
composes the rooms) both import it, and neither imports the other.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

from fibseg_jax.data import lists
from fibseg_jax.data.split import LoaderError

# Recipe fields checked as magnitudes (>= 0) and as probabilities ([0, 1]).
NON_NEGATIVE = (
  "rotation",
  "scale",
  "elastic",
  "drift",
  "noise",
  "blur",
  "curtain",
  "shading",
  "charging",
)
PROBABILITIES = ("spatial_p", "intensity_p", "artifact_p", "invert_gamma", "rare_fraction")

# The parts of the augmentation and sampling recipe with the magnitudes measured (the
# recipe ablation, `fibseg_jax.study.ablation`), as `LoaderConfig` fields; magnitudes and
# probabilities follow nnU-Net's defaults where it has the part.
RECIPE_PARTS: Mapping[str, Mapping[str, float]] = {
  "spatial": {"rotation": 180.0, "scale": 0.5, "elastic": 4.0, "spatial_p": 0.2},
  "intensity": {
    "noise": 0.1,
    "blur": 1.0,
    "contrast": 0.25,
    "lowres": 0.5,
    "invert_gamma": 0.1,
    "intensity_p": 0.15,
  },
  "artifacts": {"curtain": 0.3, "shading": 0.3, "charging": 0.3, "drift": 1.0, "artifact_p": 0.3},
  "rare_class": {"rare_fraction": 0.33},
}


@dataclasses.dataclass(frozen=True)
class LoaderConfig:
  """What the slab loader reads and how it augments.

  Attributes:
    channels: channel names to read, in model input order, e.g. ("ICE", "TLD").
    slices: slab depth S, odd; the label is that of the central slice.
    patch: y-x side of a patch in pixels; a multiple of `size_multiple`.
    batch_size: global batch size, summed over all processes.
    val_fraction: share of the annotated area held out for validation, in [0, 1); 0 holds
      none out (training needs some: `train.config.parse` asks for (0, 1)).
    val_block: side of the square y-x blocks of the validation split, in pixels.
    eval_slices: slices held out for evaluation: never trained or validated on.
    augment: master switch for every augmentation below.
    flips: random flips along y and x.
    rot90: random multiples of 90 degrees in the y-x plane.
    gain: per-channel multiplicative jitter; factor drawn from [1 - gain, 1 + gain].
    offset: per-channel additive jitter on the normalised image, from [-offset, offset].
    gamma: per-channel gamma jitter; exponent drawn from [1 - gamma, 1 + gamma].
    reverse_slab: randomly reverse the order of the slices of a slab.
    rotation: in-plane rotation by up to this many degrees either way (180: any angle);
      0 = none. Images resampled bilinearly, labels nearest (255 kept, outside the volume
      255), the same warp for every slice of a slab.
    scale: zoom by a factor drawn log-uniformly from [2**-scale, 2**scale] (0.5: about
      0.7-1.4); 0 = none.
    elastic: elastic deformation, a smooth displacement field of this magnitude in
      pixels (control points 32 px apart); 0 = none.
    spatial_p: probability of each of rotation, scaling and elastic deformation.
    drift: in-plane shift between consecutive slices of a slab, up to this many pixels
      per slice (a random walk out from the labelled centre slice); 0 = none.
    noise: additive Gaussian noise, standard deviation up to this (normalised units;
      the normalised range is about [-1, 1]); 0 = none.
    blur: Gaussian blur with sigma from [blur / 2, blur] pixels; 0 = none.
    contrast: contrast factor from [1 - contrast, 1 + contrast] about the mean; 0 = none.
    lowres: simulated low resolution: down by a factor from [1 - lowres, 1] and back up;
      0 = none.
    invert_gamma: probability that the gamma jitter bends the inverted image.
    intensity_p: probability of each of noise, blur, contrast and low resolution, per
      channel.
    curtain: depth of the FIB-SEM curtaining stripes (normalised units) along the
      milling direction (y), within 4 degrees; 0 = none.
    shading: amplitude of a smooth multiplicative detector-shading field; 0 = none.
    charging: brightness of charging streaks along the scan lines and bright patches;
      0 = none.
    artifact_p: probability of each of curtaining, shading and charging per channel
      (each detector on its own), and of drift per patch.
    rare_fraction: share of each batch's patches drawn class-balanced: a class uniformly
      among those with training pixels, then a cell by its pixels of that class (nnU-Net
      oversamples foreground in 33%); 0 = all by labelled area.
    seed: seed of the training stream (and of the split unless `split_seed` is set).
    split_seed: seed of the validation split; None uses `seed`. Fix it to compare
      models or seeds on the same held-out blocks.
    prefetch: batches read ahead by a background thread; 0 reads in the caller's thread.
    workers: threads that cast, normalise and augment the patches of a batch in parallel
      (numpy releases the GIL); 1 does it in the reading thread.
    size_multiple: the model's required multiple of the patch size (e.g. 2**depth).
    unlabelled_batch: global number of unlabelled patches per training batch, drawn
      from any slice of the stack (images only; no label is read); 0 draws none.
    teacher: a probabilities array [z, y, x, classes] uint8 (round(255 p), as `fibseg
      segment --probabilities` writes it) of the volume's shape and classes, read at the
      unlabelled patches (distillation); "" reads none.
    flag_names: field -> how the caller's command line spells it, for error messages;
      the data layer itself knows no flags.
  """

  channels: tuple[str, ...]
  slices: int
  patch: int
  batch_size: int
  val_fraction: float = 0.25
  val_block: int = 128
  eval_slices: tuple[int, ...] = ()
  augment: bool = True
  flips: bool = True
  rot90: bool = True
  gain: float = 0.1
  offset: float = 0.1
  gamma: float = 0.2
  reverse_slab: bool = True
  rotation: float = 0.0
  scale: float = 0.0
  elastic: float = 0.0
  spatial_p: float = 0.2
  drift: float = 0.0
  noise: float = 0.0
  blur: float = 0.0
  contrast: float = 0.0
  lowres: float = 0.0
  invert_gamma: float = 0.0
  intensity_p: float = 0.15
  curtain: float = 0.0
  shading: float = 0.0
  charging: float = 0.0
  artifact_p: float = 0.3
  rare_fraction: float = 0.0
  seed: int = 0
  split_seed: int | None = None
  prefetch: int = 2
  workers: int = 4
  size_multiple: int = 1
  unlabelled_batch: int = 0
  teacher: str = ""
  flag_names: Mapping[str, str] = dataclasses.field(default_factory=dict, compare=False)

  def flag(self, field: str) -> str:
    """How `field` is named in errors: as the caller spells it on its command line
    (`flag_names`, e.g. "--config.data.patch" from `train.data_config`), else the field."""
    return self.flag_names.get(field, field)

  def __post_init__(self):
    # Accept "ICE,TLD" and lists from a command line or a ConfigDict.
    channels = self.channels
    if isinstance(channels, str):
      channels = lists.parse_list(channels, str, flag=self.flag("channels"), error=LoaderError)
    object.__setattr__(self, "channels", tuple(channels))
    eval_slices = self.eval_slices
    if isinstance(eval_slices, int | str):
      eval_slices = lists.parse_list(
        eval_slices, int, flag=self.flag("eval_slices"), error=LoaderError
      )
    object.__setattr__(self, "eval_slices", tuple(eval_slices))
