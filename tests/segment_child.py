"""Runs `infer.segment_volume` in a fresh process, for tests that need one.

  python tests/segment_child.py memory VOLUME OUTPUT   # peak RSS of one segmentation
  python tests/segment_child.py devices VOLUME OUTPUT  # sharded over all devices vs one

Prints one JSON line. Also holds the tiny models the infer tests share: `PixelModel`
is a 1x1 convolution over the folded slab, so a pixel's logits depend on that pixel
alone and tiling cannot change them.
"""

from __future__ import annotations

import dataclasses
import json
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from fibseg_jax.bench import machine
from fibseg_jax.bench.jax_side import random_variables

NUM_CLASSES = 3


class PixelModel(nn.Module):
  """Logits [batch, y, x, classes] from slab [batch, slices, y, x, channels] per pixel."""

  num_classes: int = NUM_CLASSES

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    b, s, y, w, c = x.shape
    h = jnp.transpose(x, (0, 2, 3, 1, 4)).reshape(b, y, w, s * c)
    return nn.Dense(self.num_classes, name="head")(h)


def pixel_model(slices: int, channels: int, seed: int = 0):
  """(model, variables) of a `PixelModel` with random weights."""
  model = PixelModel()
  return model, random_variables(model, (1, slices, 8, 8, channels), seed)


def main(argv: list[str]) -> None:
  from fibseg_jax import infer  # noqa: PLC0415 - after the platform flags are set
  from fibseg_jax.data import volume  # noqa: PLC0415

  mode, root, output = argv[1:4]
  vol = volume.open_volume(root, check_labels=False)
  model, variables = pixel_model(3, len(vol.channels))
  settings = infer.SegmentSettings(tile=64, overlap=16, block=128, batch=3, progress=False)
  kwargs = dict(channels=vol.channels, slices=3, settings=settings)
  if mode == "memory":
    before = machine.peak_rss_mib()
    result = infer.segment_volume(vol, model, variables, output=output, **kwargs)
    print(
      json.dumps(
        {
          "rss_before_mb": before,
          "peak_rss_mb": machine.peak_rss_mib(),
          "seconds": result.seconds,
          "mpixels": result.mpixels,
          "complete": result.complete,
        }
      )
    )
  elif mode == "devices":
    sharded = infer.segment_volume(
      vol, model, variables, output=output, probabilities=output + ".probs", **kwargs
    )
    single = infer.segment_volume(
      vol,
      model,
      variables,
      output=output + ".one",
      probabilities=output + ".one.probs",
      channels=vol.channels,
      slices=3,
      settings=dataclasses.replace(settings, devices=jax.devices()[:1]),
    )
    read = lambda p: infer.open_array(p).read().result()
    predictor = infer.TilePredictor(
      model, variables, offset=[0, 0], scale=[1, 1], overlap=16, batch=3
    )
    out = predictor(np.zeros((2, 3, 64, 64, len(vol.channels)), np.uint16))
    print(
      json.dumps(
        {
          "devices": jax.device_count(),
          "padded_batch": predictor.batch,
          "output_devices": len(out.sharding.device_set),
          "labels_equal": bool(np.array_equal(read(output), read(output + ".one"))),
          "max_prob_diff": int(
            np.abs(
              read(output + ".probs").astype(int) - read(output + ".one.probs").astype(int)
            ).max()
          ),
          "complete": sharded.complete and single.complete,
        }
      )
    )
  else:
    sys.exit(f"error: unknown mode {mode!r}; expected memory or devices")


if __name__ == "__main__":
  main(sys.argv)
