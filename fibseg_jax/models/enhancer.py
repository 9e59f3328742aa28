"""The enhancer: an image and a weak classifier's class probabilities in, better ones out.

Shallow2Deep (Matskevych et al., Front. Comput. Sci. 2022) trains a U-Net to turn the
probabilities of a random forest fitted on a few brush strokes, plus the image, into
the true segmentation; trained once on data with dense truth, it corrects forests it
has never seen. Here the same idea is made free of any class or detector count:

* every class is scored by the same network, on the image and that class's own evidence
  (its forest probability, the strongest other class's probability, and how far each
  pixel's signal lies from the class's mean signal under the forest), so one set of
  weights serves 2, 4 or 6 classes and the classes can come in any order;
* every detector goes through the same stem and the stem's outputs are averaged and
  max-pooled over detectors, so one set of weights serves 1, 2 or 3 signals;
* the per-class scores are the logits of a softmax over the classes.

Batch norm (not instance norm) keeps the absolute level of a probability map: a tile
that is all one class must stay distinguishable from a tile with none of it.
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp

from fibseg_jax.models import checks, layers


@dataclasses.dataclass(frozen=True)
class EnhancerConfig(layers.BackboneConfig):
  """Hyperparameters of `Enhancer`: the backbone fields plus the detector stem.

  Attributes:
    stem: features the shared per-detector stem gives each detector.
  """

  num_classes: int = 1  # one score per class; the classes are folded into the batch
  depth: int = 3
  features: tuple[int, ...] = (16, 32, 64, 128)
  norm: str = "batch"
  stem: int = 8


def class_evidence(image: jax.Array, probabilities: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Per-class inputs of the enhancer.

  Args:
    image: `[batch, y, x, channels]` normalised detector signals.
    probabilities: `[batch, y, x, classes]` the weak classifier's class probabilities.

  Returns:
    (signal, prob): `[batch * classes, y, x, channels, 2]` each pixel's signal and its
    distance from the class's probability-weighted mean signal, and
    `[batch * classes, y, x, 3]` the class's probability, the strongest other class's
    and their difference.
  """
  b, y, x, c = image.shape
  k = probabilities.shape[-1]
  weight = probabilities.sum(axis=(1, 2))  # [b, k]
  mean = jnp.einsum("byxk,byxc->bkc", probabilities, image) / (weight[..., None] + 1.0)
  signal = jnp.broadcast_to(image[:, None], (b, k, y, x, c))
  signal = jnp.stack([signal, signal - mean[:, :, None, None, :]], axis=-1)
  p = jnp.moveaxis(probabilities, -1, 1)  # [b, k, y, x]
  others = jnp.where(jnp.eye(k, dtype=bool)[None, :, :, None, None], -1.0, p[:, None])
  strongest_other = others.max(axis=2) if k > 1 else jnp.zeros_like(p)
  prob = jnp.stack([p, strongest_other, p - strongest_other], axis=-1)
  return signal.reshape(b * k, y, x, c, 2), prob.reshape(b * k, y, x, 3)


class Enhancer(nn.Module):
  """Image + class probabilities -> class logits, for any class and detector count.

  Attributes:
    config: the hyperparameters.
  """

  config: EnhancerConfig

  @nn.compact
  def __call__(self, image: jax.Array, probabilities: jax.Array, train: bool = False) -> jax.Array:
    """Scores every class of every pixel.

    Args:
      image: `[batch, y, x, channels]` normalised detector signals (1-3 channels); y and
        x multiples of `config.size_multiple`.
      probabilities: `[batch, y, x, classes]` a weak classifier's class probabilities.
      train: batch statistics (and updates, with `mutable=['batch_stats']`).

    Returns:
      float32 logits `[batch, y, x, classes]`.

    Raises:
      InputShapeError: shapes that differ or do not fit the config.
    """
    cfg = self.config
    if image.ndim != 4 or probabilities.ndim != 4 or image.shape[:3] != probabilities.shape[:3]:
      raise checks.InputShapeError(
        f"enhancer: image [batch, y, x, channels] and probabilities [batch, y, x, classes] "
        f"must share batch, y and x; got {list(image.shape)} and {list(probabilities.shape)}"
      )
    b, y, x, c = image.shape
    k = probabilities.shape[-1]
    checks.check_slab_shape(cfg.depth, 1, y, x)
    dtype = layers.compute_dtype(cfg)
    signal, prob = class_evidence(image.astype(jnp.float32), probabilities.astype(jnp.float32))
    # One stem for every detector: [b k, y, x, c, 2] -> [b k, y, x, c, stem] -> pooled.
    stem = nn.Conv(cfg.stem, (3, 3), dtype=dtype, name="stem")
    h = stem(jnp.moveaxis(signal, 3, 1).reshape(b * k * c, y, x, 2).astype(dtype))
    h = layers.activation_fn(cfg)(h).reshape(b * k, c, y, x, cfg.stem)
    h = jnp.concatenate([h.mean(axis=1), h.max(axis=1), prob.astype(dtype)], axis=-1)

    skips = []
    for level in range(cfg.depth + 1):
      if level:
        h = nn.max_pool(h, (2, 2), strides=(2, 2))
      h = layers.ConvBlock(cfg, cfg.features[level], name=f"down{level}")(h, train)
      skips.append(h)
    h = skips.pop()
    for level, (up_width, width) in reversed(list(enumerate(layers.decoder_widths(cfg)))):
      h = layers.UpBlock(cfg, up_width, width, name=f"up{level}")(h, skips.pop(), train)
    score = nn.Conv(1, (1, 1), dtype=dtype, name="head")(h).astype(jnp.float32)
    # A learned multiple of the class's own probability as a skip: the network learns a
    # correction to the weak classifier.
    score = score[..., 0] + nn.Dense(1, name="prior_gain")(prob[..., :1])[..., 0]
    return jnp.moveaxis(score.reshape(b, k, y, x), 1, -1)
