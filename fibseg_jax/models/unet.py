"""2.5D U-Net (Ronneberger et al., MICCAI 2015) over a slab of serial sections.

The slices and channels of the slab are folded into the input features of one 2D
network, so the model sees e.g. 3 slices x (ICE, TLD) as 6 input channels and predicts
the central slice.

The default config is MONAI's ``BasicUNet(spatial_dims=2)``: features
(32, 32, 64, 128, 256, 32), instance norm with affine, LeakyReLU 0.1, max-pool down,
transposed-conv up, biased convolutions. It has the same layers and parameter count
(1,979,972 for 6 input channels and 4 classes), which makes it the PyTorch peer that
the benchmarks race.
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp

from fibseg_jax.models import checks, layers


@dataclasses.dataclass(frozen=True)
class UNetConfig(layers.BackboneConfig):
  """Hyperparameters of `UNet`: the fields and defaults of `layers.BackboneConfig`."""


class UNet(nn.Module):
  """2.5D U-Net: the slab's slices x channels are the input features of a 2D U-Net.

  Attributes:
    config: the hyperparameters.
  """

  config: UNetConfig

  @nn.compact
  def __call__(
    self, x: jax.Array, train: bool = False, deep_supervision: bool = False
  ) -> jax.Array | tuple[jax.Array, ...]:
    """Segments the central slice of each slab.

    Args:
      x: slab batch `[batch, slices, y, x, channels]`; slices odd, y and x multiples of
        `config.size_multiple`.
      train: use batch statistics (and update them, with `mutable=['batch_stats']`) and
        dropout (needs `rngs={'dropout': key}` when `config.dropout > 0`).
      deep_supervision: also return the logits of the lower decoder levels, from heads
        `aux_head{level}` that exist only when this is asked for (training).

    Returns:
      float32 logits `[batch, y, x, num_classes]` for the central slice; with
      `deep_supervision` a tuple of them, one per `layers.supervised_levels(config)`:
      entry l is `[batch, y / 2**l, x / 2**l, num_classes]`, entry 0 the usual logits.

    Raises:
      InputShapeError: `x` is not 5-D or its sizes do not fit the config.
    """
    cfg = self.config
    batch, slices, y, x_size, channels = checks.check_slab_batch(cfg.depth, x.shape)
    # Fold slices into features, slice-major: feature s * channels + c.
    h = jnp.transpose(x, (0, 2, 3, 1, 4)).reshape(batch, y, x_size, slices * channels)
    h = h.astype(layers.compute_dtype(cfg))

    skips = []
    for level in range(cfg.depth + 1):
      if level:
        h = nn.max_pool(h, (2, 2), strides=(2, 2))
      h = layers.ConvBlock(cfg, cfg.features[level], name=f"down{level}")(h, train)
      skips.append(h)

    h = skips.pop()
    aux = {}
    for level, (up_width, width) in reversed(list(enumerate(layers.decoder_widths(cfg)))):
      h = layers.UpBlock(cfg, up_width, width, name=f"up{level}")(h, skips.pop(), train)
      if deep_supervision and level:
        aux[level] = layers.aux_logits(cfg, level, h)

    logits = nn.Conv(cfg.num_classes, (1, 1), dtype=layers.compute_dtype(cfg), name="head")(h)
    logits = logits.astype(jnp.float32)
    if not deep_supervision:
      return logits
    return (logits, *(aux[level] for level in layers.supervised_levels(cfg)[1:]))
