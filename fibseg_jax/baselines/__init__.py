"""Classical baselines: the routes users take today, scored like the networks.

  otsu        multi-Otsu thresholds of the raw signals, classes matched by mean intensity
  clean_otsu  curtain removal (wavelet-FFT, Muench et al. 2009), flat field, non-local
              means, then multi-Otsu
  forest      random forest on multiscale filter features (the ilastik / Weka route)

Each route maps a raw slice [y, x, channels] to labels [y, x] uint8 and learns from the
same training pixels as a network (`training_slices`). `clean_volume` writes a cleaned
copy of a volume, e.g. to train a network on cleaned inputs.
"""

from fibseg_jax.baselines.cleaning import (
  CleaningConfig,
  background,
  clean_slice,
  clean_volume,
  denoise,
  destripe,
  flat_field,
)
from fibseg_jax.baselines.forest import ForestConfig, RandomForest, features, tiled_features
from fibseg_jax.baselines.routes import (
  ROUTES,
  Route,
  make_route,
  training_slices,
  write_probabilities,
)
from fibseg_jax.baselines.threshold import MultiOtsu, channel_thresholds

__all__ = [
  "ROUTES",
  "CleaningConfig",
  "ForestConfig",
  "MultiOtsu",
  "RandomForest",
  "Route",
  "background",
  "channel_thresholds",
  "clean_slice",
  "clean_volume",
  "denoise",
  "destripe",
  "features",
  "flat_field",
  "make_route",
  "tiled_features",
  "training_slices",
  "write_probabilities",
]
