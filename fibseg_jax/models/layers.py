"""2D building blocks shared by the U-Net and Sensor-3D: conv blocks, upsampling, widths.

The blocks follow MONAI's BasicUNet (``TwoConv``, ``UpCat``) so that a U-Net configured
like it has the same layers and parameter count: each convolution is followed by norm,
dropout, activation in that order, and the decoder concatenates [skip, upsampled].

Every block reads its hyperparameters from the model config (`UNetConfig` or
`Sensor3DConfig`, which share the backbone fields) and computes in `config.dtype` with
float32 parameters.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from fibseg_jax.models import checks

# PyTorch's InstanceNorm / BatchNorm / GroupNorm epsilon, so MONAI ports match numerically.
NORM_EPSILON = 1e-5

# Name prefix of the deep-supervision heads in the params tree (`aux_head1`, ...): they
# exist only in training state and are no part of the inference network.
AUX_HEAD = "aux_head"


@dataclasses.dataclass(frozen=True)
class BackboneConfig:
  """The fields shared by the model configs: the 2D backbone the blocks here read.

  The defaults are MONAI's ``BasicUNet(spatial_dims=2)``; each model's config subclasses
  this, adds its own fields and may change a default.

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


def compute_dtype(config: BackboneConfig) -> jnp.dtype:
  """The dtype the model computes in (parameters stay float32)."""
  return jnp.dtype(config.dtype)


def activation_fn(config: BackboneConfig) -> Callable[[jax.Array], jax.Array]:
  """The activation named by `config.activation`."""
  if config.activation == "leaky_relu":
    return functools.partial(nn.leaky_relu, negative_slope=config.negative_slope)
  return {"relu": nn.relu, "elu": nn.elu, "gelu": nn.gelu, "silu": nn.silu}[config.activation]


def decoder_widths(config: BackboneConfig) -> list[tuple[int, int]]:
  """(upsampled width, output width) of each decoder level, index 0 = top level.

  The decoder at level l upsamples the map from level l + 1, concatenates the encoder
  skip of width `features[l]` and applies a conv block of the output width. The upsample
  halves the channels of its input (Ronneberger et al.; MONAI ``UpCat(halves=True)``).
  With `depth + 2` features the top level outputs `features[-1]` and its upsample keeps
  the channels, which is MONAI BasicUNet's ``upcat_1(halves=False)``.

  Args:
    config: model config.

  Returns:
    `depth` pairs (up_width, out_width), index l for decoder level l.
  """
  depth, features = config.depth, config.features
  outs = list(features[:depth])
  top_width = len(features) == depth + 2
  if top_width:
    outs[0] = features[-1]
  widths = []
  for level in range(depth):
    in_width = features[depth] if level == depth - 1 else outs[level + 1]
    up = in_width if (level == 0 and top_width) else max(in_width // 2, 1)
    widths.append((up, outs[level]))
  return widths


def supervised_levels(config: BackboneConfig) -> tuple[int, ...]:
  """Decoder levels whose outputs deep supervision trains, level 0 (full resolution) first.

  Level l has 1/2**l of the input's y and x. nnU-Net gives the lowest-resolution decoder
  level weight 0 (see `fibseg_jax.train.losses.deep_supervision_weights`), so it gets no
  head; a depth-1 model has only level 0.

  Args:
    config: model config.

  Returns:
    (0, 1, ..., depth - 2), or (0,) for depth 1.
  """
  return tuple(range(max(config.depth - 1, 1)))


def aux_logits(config: BackboneConfig, level: int, h: jax.Array) -> jax.Array | None:
  """The deep-supervision logits of a decoder level, or None if the level has no head.

  Call it inside a model's compact `__call__`, and only when deep supervision is asked
  for: the head `aux_head{level}` (a 1x1 conv, like the model's `head`) becomes a child
  of that model, so a model called without it has exactly its inference parameters.

  Args:
    config: model config.
    level: decoder level, 1 .. depth - 1.
    h: `[batch, y, x, channels]` output of that decoder level.

  Returns:
    float32 logits `[batch, y, x, num_classes]`, or None for an unsupervised level.
  """
  if level == 0 or level not in supervised_levels(config):
    return None
  head = nn.Conv(config.num_classes, (1, 1), dtype=compute_dtype(config), name=f"{AUX_HEAD}{level}")
  return head(h).astype(jnp.float32)


def norm_layer(config: BackboneConfig, train: bool, name: str) -> nn.Module | None:
  """The normalisation named by `config.norm`, channels last, or None for "none".

  Args:
    config: model config.
    train: batch norm normalises with batch statistics (and updates the running ones).
    name: the layer's name in the params tree.

  Returns:
    A flax layer mapping `[batch, y, x, channels]` to the same shape, or None.
  """
  dtype = compute_dtype(config)
  if config.norm == "batch":
    return nn.BatchNorm(
      use_running_average=not train, momentum=0.9, epsilon=NORM_EPSILON, dtype=dtype, name=name
    )
  if config.norm == "instance":
    return nn.InstanceNorm(epsilon=NORM_EPSILON, dtype=dtype, name=name)
  if config.norm == "group":
    return nn.GroupNorm(num_groups=config.norm_groups, epsilon=NORM_EPSILON, dtype=dtype, name=name)
  return None


class ConvBlock(nn.Module):
  """Two 3x3 convolutions, each followed by norm, dropout, activation (MONAI ``TwoConv``).

  Attributes:
    config: model config.
    features: output channels of both convolutions.
  """

  config: BackboneConfig
  features: int

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    """Applies the block.

    Args:
      x: `[batch, y, x, channels]`.
      train: use batch statistics and dropout.

    Returns:
      `[batch, y, x, features]` in the compute dtype.
    """
    cfg = self.config
    act = activation_fn(cfg)
    for i in range(2):
      x = nn.Conv(
        self.features,
        (3, 3),
        padding="SAME",
        use_bias=cfg.conv_bias,
        dtype=compute_dtype(cfg),
        name=f"conv{i}",
      )(x)
      norm = norm_layer(cfg, train, f"norm{i}")
      if norm is not None:
        x = norm(x)
      x = nn.Dropout(cfg.dropout, deterministic=not train)(x)
      x = act(x)
    return x


class TransposedConv2x2(nn.Module):
  """`nn.ConvTranspose(features, (2, 2), strides=(2, 2), padding="VALID")`, as an einsum.

  A stride-2 2x2 transposed conv has no overlap between output blocks: each input pixel
  writes its own 2x2 block. Written as one einsum and a reshape it gives the same
  outputs and parameters (`kernel` [2, 2, in, out], `bias` [out], so checkpoints are
  interchangeable), but XLA:CPU computes its weight gradient ~20x faster than for the
  lhs-dilated convolution flax lowers ConvTranspose to (see BUILD_NOTES.md).

  Attributes:
    features: output channels.
    dtype: compute dtype; parameters are float32.
  """

  features: int
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """Maps `x: [batch, y, x, in]` to `[batch, 2y, 2x, features]`."""
    kernel = self.param(
      "kernel", nn.linear.default_kernel_init, (2, 2, x.shape[-1], self.features), jnp.float32
    )
    bias = self.param("bias", nn.initializers.zeros_init(), (self.features,), jnp.float32)
    x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias, dtype=self.dtype)
    batch, y, x_size, _ = x.shape
    # ConvTranspose (transpose_kernel=False) applies the spatially flipped kernel.
    out = jnp.einsum("bhwc,klco->bhkwlo", x, kernel[::-1, ::-1])
    return out.reshape(batch, 2 * y, 2 * x_size, self.features) + bias


class Upsample(nn.Module):
  """Doubles y and x: a 2x2 stride-2 transposed conv, or bilinear resize then 3x3 conv.

  Resize-then-convolve avoids the checkerboard artefacts of transposed convolutions
  (Odena et al. 2016) at the cost of a 3x3 conv at the higher resolution.

  Attributes:
    config: model config; `config.upsample` picks the method.
    features: output channels.
  """

  config: BackboneConfig
  features: int

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """Upsamples `x: [batch, y, x, channels]` to `[batch, 2y, 2x, features]`."""
    cfg = self.config
    dtype = compute_dtype(cfg)
    if cfg.upsample == "transpose":
      return TransposedConv2x2(self.features, dtype=dtype, name="conv")(x)
    batch, y, x_size, channels = x.shape
    x = jax.image.resize(x, (batch, 2 * y, 2 * x_size, channels), method="bilinear")
    return nn.Conv(self.features, (3, 3), padding="SAME", dtype=dtype, name="conv")(x)


class UpBlock(nn.Module):
  """Upsample, concatenate [skip, upsampled], conv block (MONAI ``UpCat``).

  Attributes:
    config: model config.
    up_features: channels after upsampling.
    features: output channels.
  """

  config: BackboneConfig
  up_features: int
  features: int

  @nn.compact
  def __call__(self, x: jax.Array, skip: jax.Array, train: bool) -> jax.Array:
    """Applies the block.

    Args:
      x: `[batch, y, x, channels]` from the level below.
      skip: `[batch, 2y, 2x, skip_channels]` from the encoder at this level.
      train: use batch statistics and dropout.

    Returns:
      `[batch, 2y, 2x, features]`.
    """
    up = Upsample(self.config, self.up_features, name="up")(x)
    x = jnp.concatenate([skip, up.astype(skip.dtype)], axis=-1)
    return ConvBlock(self.config, self.features, name="convs")(x, train)
