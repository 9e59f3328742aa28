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
class UNetConfig:
  """Hyperparameters of `UNet`.

  Attributes:
    num_classes: output classes (phases).
    depth: number of 2x2 max-poolings; y and x must be multiples of 2**depth.
    features: widths, one per level from the top (`depth + 1` entries); a `depth + 2`th
      entry sets the width of the top decoder level on its own (MONAI's f5), whose
      upsample then keeps its channels instead of halving them.
    norm: "batch", "instance" (affine), "group" or "none".
    norm_groups: number of groups for `norm="group"`.
    activation: "relu", "leaky_relu", "elu", "gelu" or "silu".
    negative_slope: slope of "leaky_relu" below zero.
    upsample: "transpose" (2x2 stride-2 transposed conv) or "resize" (bilinear, 3x3 conv).
    dropout: rate after every norm, as in MONAI's conv blocks.
    conv_bias: bias on the 3x3 convolutions (redundant before batch norm).
    dtype: compute dtype, "float32" or "bfloat16"; parameters and logits are float32.
  """

  num_classes: int = 4
  depth: int = 4
  features: tuple[int, ...] = (32, 32, 64, 128, 256, 32)
  norm: str = "instance"
  norm_groups: int = 8
  activation: str = "leaky_relu"
  negative_slope: float = 0.1
  upsample: str = "transpose"
  dropout: float = 0.0
  conv_bias: bool = True
  dtype: str = "float32"

  def __post_init__(self):
    checks.check_backbone_config(self)

  @property
  def size_multiple(self) -> int:
    """y and x of an input must be multiples of this."""
    return 2**self.depth


class UNet(nn.Module):
  """2.5D U-Net: the slab's slices x channels are the input features of a 2D U-Net.

  Attributes:
    config: the hyperparameters.
  """

  config: UNetConfig

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    """Segments the central slice of each slab.

    Args:
      x: slab batch `[batch, slices, y, x, channels]`; slices odd, y and x multiples of
        `config.size_multiple`.
      train: use batch statistics (and update them, with `mutable=['batch_stats']`) and
        dropout (needs `rngs={'dropout': key}` when `config.dropout > 0`).

    Returns:
      float32 logits `[batch, y, x, num_classes]` for the central slice.

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
    for level, (up_width, width) in reversed(list(enumerate(layers.decoder_widths(cfg)))):
      h = layers.UpBlock(cfg, up_width, width, name=f"up{level}")(h, skips.pop(), train)

    logits = nn.Conv(cfg.num_classes, (1, 1), dtype=layers.compute_dtype(cfg), name="head")(h)
    return logits.astype(jnp.float32)
