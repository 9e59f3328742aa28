"""Sensor-3D (Novikov et al., IEEE TMI 38 (2019) 1207-1215) over a slab of serial sections.

A U-Net whose 2D layers run on every slice of the slab with shared weights (the slices
are folded into the batch), with bidirectional ConvLSTMs running along the slice axis at
chosen levels, by default the bottleneck and the top decoder level just before the head.
The head segments the central slice (or every slice with `all_slices=True`).

The conv blocks, upsampling and widths are those of `UNet` (see `layers`), so a U-Net
and a Sensor-3D with the same backbone fields differ only in how they use the slices.

Default size: features (16, 32, 64, 128), depth 3: 1.38M parameters (the default
U-Net has 1.98M), most of them in the bottleneck LSTM. The encoder and decoder run once
per slice, so compute grows with the slab: at 256 x 256, 17 GFLOP for 3 slices and
27 GFLOP for 5, against 10 GFLOP for the U-Net (XLA cost analysis, CPU). Half the
U-Net's widths and one level less keep it within about 3x of the U-Net's compute.

Params of the ConvLSTM at level l are under `lstm{l}` (l = depth is the bottleneck)
and can be imported from Keras with `convlstm.from_keras`.
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp

from fibseg_jax.models import checks, convlstm, layers


@dataclasses.dataclass(frozen=True)
class Sensor3DConfig(layers.BackboneConfig):
  """Hyperparameters of `Sensor3D`: `layers.BackboneConfig` (smaller by default) and the
  ConvLSTMs.

  Attributes:
    features: widths, one per level from the top (`depth + 1` entries), optionally
      followed by the width of the top decoder level (see `UNetConfig.features`).
    norm: "batch", "instance" (affine), "group" or "none"; applied per slice.
    lstm_levels: levels followed by a bidirectional ConvLSTM over the slices: `depth`
      (or -1) is the bottleneck, l < depth the output of decoder level l, 0 the last one
      before the head. Negative values count from the bottleneck as in Python indexing.
    lstm_kernel: kernel side of the ConvLSTM convolutions.
  """

  depth: int = 3
  features: tuple[int, ...] = (16, 32, 64, 128)
  lstm_levels: tuple[int, ...] = (-1, 0)
  lstm_kernel: int = 3

  def __post_init__(self):
    super().__post_init__()
    if not isinstance(self.lstm_levels, tuple):
      raise checks.ModelConfigError(
        f"model.lstm_levels={self.lstm_levels!r} must be a tuple of levels"
      )
    levels = range(-self.depth - 1, self.depth + 1)
    for level in self.lstm_levels:
      if not checks.is_int(level) or level not in levels:
        raise checks.ModelConfigError(
          f"model.lstm_levels={self.lstm_levels} has {level!r}; levels of depth {self.depth} "
          f"are 0..{self.depth} ({self.depth} or -1 is the bottleneck)"
        )
    resolved = [level % (self.depth + 1) for level in self.lstm_levels]
    if len(set(resolved)) != len(resolved):
      raise checks.ModelConfigError(
        f"model.lstm_levels={self.lstm_levels} names a level twice (levels {resolved})"
      )
    widths = self.level_widths
    odd = [level for level in resolved if widths[level] % 2]
    if odd:
      raise checks.ModelConfigError(
        f"model.lstm_levels: level(s) {odd} have odd widths {[widths[k] for k in odd]}; "
        "each LSTM direction gets half of the width, so those widths must be even"
      )
    if not checks.is_int(self.lstm_kernel) or self.lstm_kernel < 1 or self.lstm_kernel % 2 == 0:
      raise checks.ModelConfigError(
        f"model.lstm_kernel={self.lstm_kernel!r} must be an odd positive integer"
      )

  @property
  def level_widths(self) -> tuple[int, ...]:
    """Channels at the point where an LSTM of each level 0..depth would sit."""
    decoder = [width for _, width in layers.decoder_widths(self)]
    return (*decoder, self.features[self.depth])

  @property
  def resolved_lstm_levels(self) -> frozenset[int]:
    """`lstm_levels` as non-negative levels."""
    return frozenset(level % (self.depth + 1) for level in self.lstm_levels)


class Sensor3D(nn.Module):
  """Per-slice 2D U-Net with bidirectional ConvLSTMs along the slices.

  Attributes:
    config: the hyperparameters.
  """

  config: Sensor3DConfig

  @nn.compact
  def __call__(
    self,
    x: jax.Array,
    train: bool = False,
    all_slices: bool = False,
    deep_supervision: bool = False,
  ) -> jax.Array | tuple[jax.Array, ...]:
    """Segments the central slice (or all slices) of each slab.

    Args:
      x: slab batch `[batch, slices, y, x, channels]`; slices odd, y and x multiples of
        `config.size_multiple`.
      train: use batch statistics (and update them, with `mutable=['batch_stats']`) and
        dropout (needs `rngs={'dropout': key}` when `config.dropout > 0`).
      all_slices: return logits for every slice instead of the central one.
      deep_supervision: also return the logits of the lower decoder levels (after their
        ConvLSTM, if any), from heads `aux_head{level}` that exist only when this is
        asked for (training).

    Returns:
      float32 logits `[batch, y, x, num_classes]` for the central slice, or
      `[batch, slices, y, x, num_classes]` with `all_slices`; with `deep_supervision` a
      tuple of them, one per `layers.supervised_levels(config)`: entry l has y and x
      divided by 2**l, entry 0 is the usual logits.

    Raises:
      InputShapeError: `x` is not 5-D or its sizes do not fit the config.
    """
    cfg = self.config
    batch, slices, y, x_size, channels = checks.check_slab_batch(cfg.depth, x.shape)
    dtype = layers.compute_dtype(cfg)
    lstm_levels = cfg.resolved_lstm_levels

    def unfold(h: jax.Array) -> jax.Array:
      return h.reshape(batch, slices, *h.shape[1:])

    def fold(h: jax.Array) -> jax.Array:
      return h.reshape(batch * slices, *h.shape[2:])

    def maybe_lstm(h: jax.Array, level: int) -> jax.Array:
      if level not in lstm_levels:
        return h
      lstm = convlstm.BidirectionalConvLSTM(
        h.shape[-1] // 2, (cfg.lstm_kernel, cfg.lstm_kernel), dtype=dtype, name=f"lstm{level}"
      )
      return fold(lstm(unfold(h)))

    # Slices ride in the batch axis, so every 2D layer is shared across them.
    h = fold(x).astype(dtype)
    skips = []
    for level in range(cfg.depth + 1):
      if level:
        h = nn.max_pool(h, (2, 2), strides=(2, 2))
      h = layers.ConvBlock(cfg, cfg.features[level], name=f"down{level}")(h, train)
      skips.append(h)
    h = maybe_lstm(skips.pop(), cfg.depth)

    def select(h: jax.Array) -> jax.Array:
      h = unfold(h)
      return h if all_slices else h[:, slices // 2]

    aux = {}
    for level, (up_width, width) in reversed(list(enumerate(layers.decoder_widths(cfg)))):
      h = layers.UpBlock(cfg, up_width, width, name=f"up{level}")(h, skips.pop(), train)
      h = maybe_lstm(h, level)
      if deep_supervision and level:
        aux[level] = layers.aux_logits(cfg, level, select(h))

    logits = nn.Conv(cfg.num_classes, (1, 1), dtype=dtype, name="head")(select(h))
    logits = logits.astype(jnp.float32)
    if not deep_supervision:
      return logits
    return (logits, *(aux[level] for level in layers.supervised_levels(cfg)[1:]))
