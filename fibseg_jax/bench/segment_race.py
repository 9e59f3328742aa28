"""Whole-stack segmentation with default flags, and against MONAI's sliding window.

`segment_mpx_per_s`: `infer.segment_volume` with `SegmentSettings()` and the --tta
default ("auto") on a generated stack, end to end (read, normalise, tile, forward, blend,
argmax, zarr write), Mpixel/s of output; compiled once before the timed repetitions, as
a long stack amortises it.

`segment_race_vs_monai`: the same network's weights (fibseg_jax's U-Net copied into
MONAI's BasicUNet, outputs checked to agree on a tile) in
`monai.inferers.sliding_window_inference` (roi = our tile, overlap = our overlap / tile,
Gaussian blending of the softmax probabilities, the slab read with tensorstore, labels
written to a zarr v3 array with tensorstore), against fibseg_jax with the same tile,
overlap, batch and Gaussian window; one process, alternating repetitions
(`timing.race`). The ratio is MONAI's median seconds over ours: > 1 means we are faster.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import tensorstore as ts

from fibseg_jax import infer, models
from fibseg_jax.bench import data_path, jax_side, peer, timing
from fibseg_jax.bench.options import CHANNELS, CLASSES, RACE, STUDY_BY_NAME, Options, model_config
from fibseg_jax.data import volume as volume_lib
from fibseg_jax.infer import tiling

# Largest |probability difference| on a tile between the two frameworks that still
# counts as "the same network" (float32 convolutions summed in other orders).
AGREEMENT = 1e-3


def torch_state_dict(params: Mapping[str, Any], torch: Any) -> dict[str, Any]:
  """fibseg_jax U-Net parameters as a MONAI BasicUNet state dict.

  Names: down0 -> conv_0, down{i} -> down_{i}.convs, up{i} -> upcat_{i + 1}, head ->
  final_conv; conv kernels [kh, kw, in, out] -> [out, in, kh, kw]; the 2x2 transposed
  conv's kernel, which flax applies flipped, -> [in, out, kh, kw] flipped back; norm
  scale and bias -> the instance norm's weight and bias.
  """
  state = {}

  def conv_block(prefix: str, block: Mapping[str, Any]) -> None:
    for i in range(2):
      conv, norm = block[f"conv{i}"], block[f"norm{i}"]
      kernel = np.asarray(conv["kernel"]).transpose(3, 2, 0, 1)
      state[f"{prefix}.conv_{i}.conv.weight"] = kernel
      state[f"{prefix}.conv_{i}.conv.bias"] = np.asarray(conv["bias"])
      state[f"{prefix}.conv_{i}.adn.N.weight"] = np.asarray(norm["scale"])
      state[f"{prefix}.conv_{i}.adn.N.bias"] = np.asarray(norm["bias"])

  for name, block in params.items():
    if name == "down0":
      conv_block("conv_0", block)
    elif name.startswith("down"):
      conv_block(f"down_{name[4:]}.convs", block)
    elif name.startswith("up"):
      prefix = f"upcat_{int(name[2:]) + 1}"
      up = block["up"]["conv"]
      state[f"{prefix}.upsample.deconv.weight"] = np.asarray(up["kernel"])[::-1, ::-1].transpose(
        2, 3, 0, 1
      )
      state[f"{prefix}.upsample.deconv.bias"] = np.asarray(up["bias"])
      conv_block(f"{prefix}.convs", block["convs"])
    elif name == "head":
      state["final_conv.weight"] = np.asarray(block["kernel"]).transpose(3, 2, 0, 1)
      state["final_conv.bias"] = np.asarray(block["bias"])
  return {k: torch.from_numpy(np.ascontiguousarray(v, np.float32)) for k, v in state.items()}


def monai_unet(the_peer: peer.Peer, config: Mapping[str, Any], in_channels: int, variables):
  """MONAI's BasicUNet with the weights of fibseg_jax's U-Net `variables`, in eval mode."""
  net = the_peer.monai.networks.nets.BasicUNet(
    spatial_dims=2,
    in_channels=in_channels,
    out_channels=config["num_classes"],
    features=tuple(config["features"]),
  )
  net.load_state_dict(torch_state_dict(variables["params"], the_peer.torch), strict=True)
  return net.eval()


def agreement(model, variables, net, the_peer: peer.Peer, tile: int, slices: int) -> float:
  """Largest |softmax difference| of the two networks on one random normalised tile."""
  torch = the_peer.torch
  x = np.random.default_rng(3).standard_normal((1, slices, tile, tile, len(CHANNELS)))
  x = x.astype(np.float32)
  ours = jax.nn.softmax(model.apply(variables, jnp.asarray(x), train=False), axis=-1)
  with torch.inference_mode():
    theirs = torch.softmax(net(torch.from_numpy(peer.as_features_first(x))), dim=1)
  return float(np.abs(np.asarray(ours) - theirs.numpy().transpose(0, 2, 3, 1)).max())


class FibsegSegment:
  """A timing side: `infer.segment_volume` of the whole stack with these settings."""

  def __init__(self, volume, model, variables, output: str, settings, size_multiple: int):
    self._args = (volume, model, variables)
    self._size_multiple = size_multiple
    self._output = output
    self._settings = settings
    self.mpixels = 0.0

  def _run(self) -> None:
    volume, model, variables = self._args
    result = infer.segment_volume(
      volume,
      model,
      variables,
      channels=CHANNELS,
      slices=STUDY_BY_NAME[RACE].slices,
      classes=CLASSES,
      size_multiple=self._size_multiple,
      output=self._output,
      settings=self._settings,
    )
    self.mpixels = result.mpixels

  def prepare(self) -> None:
    self._run()  # compiles the forward pass, kept for the process (`predict._FORWARDS`)

  def __call__(self) -> None:
    self._run()

  def device_peak(self) -> int | None:
    return None


class MonaiSegment:
  """A timing side: MONAI's sliding window over every slice, labels written with tensorstore.

  What a MONAI user writes: read the slab of each slice (reflected at the stack ends),
  normalise, `sliding_window_inference` with a softmax predictor and Gaussian blending,
  argmax, write the slice.
  """

  def __init__(self, the_peer, net, volume, output: str, *, tile: int, overlap: int, batch: int):
    self._peer = the_peer
    self._net = net
    self._volume = volume
    self._output = output
    self._tile, self._overlap, self._batch = tile, overlap, batch
    self._labels = None

  def prepare(self) -> None:
    self._image = ts.open(
      {"driver": "zarr3", "kvstore": volume_lib.child_spec(self._volume.kvstore, "image")},
      open=True,
    ).result()
    self._labels = ts.open(
      {
        "driver": "zarr3",
        "kvstore": {"driver": "file", "path": self._output},
        "metadata": {
          "shape": list(self._volume.shape),
          "data_type": "uint8",
          "chunk_grid": {
            "name": "regular",
            "configuration": {"chunk_shape": [1, *(min(512, s) for s in self._volume.shape[1:])]},
          },
        },
      },
      create=True,
      delete_existing=True,
    ).result()
    offset, scale = self._volume.normalization(CHANNELS)
    self._offset = np.asarray(offset, np.float32)
    self._scale = np.asarray(scale, np.float32)
    self._channels = list(self._volume.channel_indices(CHANNELS, flag="channels"))

  def __call__(self) -> None:
    torch = self._peer.torch
    inferers = self._peer.monai.inferers
    depth = self._volume.shape[0]
    slices = STUDY_BY_NAME[RACE].slices

    def predictor(x):
      return torch.softmax(self._net(x), dim=1)

    for z in range(depth):
      zs = [int(k) for k in tiling.slab_indices(z, slices, depth)]
      slab = np.stack([self._image[k].read().result()[..., self._channels] for k in zs])
      x = (slab.astype(np.float32) - self._offset) * self._scale
      x = torch.from_numpy(peer.as_features_first(x[None]))
      with torch.inference_mode():
        probs = inferers.sliding_window_inference(
          x,
          roi_size=(self._tile, self._tile),
          sw_batch_size=self._batch,
          predictor=predictor,
          overlap=self._overlap / self._tile,
          mode="gaussian",
        )
      labels = probs[0].argmax(dim=0).to(torch.uint8).numpy()
      self._labels[z].write(labels).result()

  def device_peak(self) -> int | None:
    return None


def measure(
  options: Options, workdir: str, the_peer: peer.Peer, shape: Sequence[int] | None = None
) -> dict[str, Any]:
  """Times the default path, and the race against MONAI when the peer is there.

  Args:
    options: the race U-Net (`model_config`), repetitions (at most 3 timed, as each
      segments a whole stack) and `segment_shape` (the stack) unless `shape` is given.
    workdir: where the stack and outputs go.
    the_peer: MONAI, or why not.
    shape: (z, y, x) of the stack.

  Returns:
    {"shape", "settings", "default": race entry, "segment_mpx_per_s", and with the peer
    "race": {"fibseg_jax", "monai"}, "agreement", "segment_race_vs_monai"; without it
    "note"}.
  """
  shape = tuple(shape or options.segment_shape)
  root = os.path.join(workdir, "segment_race.zarr")
  data_path.write_test_volume(root, shape, volume_lib.DEFAULT_CHUNK_YX, seed=2)
  vol = volume_lib.open_volume(root, check_labels=False)
  config = model_config(options, STUDY_BY_NAME[RACE].model)
  model = models.build(config)
  slices = STUDY_BY_NAME[RACE].slices
  default = infer.SegmentSettings(tta="auto", overwrite=True, progress=False)
  variables = jax_side.random_variables(model, (1, slices, 64, 64, len(CHANNELS)), seed=0)
  steps, warmup = min(options.steps, 3), 0
  multiple = models.size_multiple(config)
  fibseg = FibsegSegment(
    vol, model, variables, os.path.join(workdir, "race_default.zarr"), default, multiple
  )
  result: dict[str, Any] = {
    "shape": list(shape),
    "settings": {"tile": default.tile, "overlap": default.overlap, "batch": default.batch},
    "tta_passes": infer.settings.tta_passes("auto", jax.default_backend()),
  }
  sides: dict[str, Any] = {"default": fibseg}
  if the_peer.available:
    net = monai_unet(the_peer, config, slices * len(CHANNELS), variables)
    result["agreement"] = agreement(model, variables, net, the_peer, 64, slices)
    if result["agreement"] > AGREEMENT:
      raise RuntimeError(
        f"MONAI's BasicUNet with our weights differs by {result['agreement']:.2g} on a tile"
      )
    race = dataclasses.replace(default, window="gaussian", tta=1)
    sides["fibseg_jax"] = FibsegSegment(
      vol, model, variables, os.path.join(workdir, "race_ours.zarr"), race, multiple
    )
    sides["monai"] = MonaiSegment(
      the_peer,
      net,
      vol,
      os.path.join(workdir, "race_monai.zarr"),
      tile=default.tile,
      overlap=default.overlap,
      batch=default.batch,
    )
  else:
    result["note"] = the_peer.note or "MONAI was not measured"
  timed = timing.race(sides, steps, warmup)
  mpixels = shape[0] * shape[1] * shape[2] / 1e6
  result["default"] = timed["default"]
  result["segment_mpx_per_s"] = mpixels / timed["default"]["step_s_median"]
  if the_peer.available:
    result["race"] = {k: timed[k] for k in ("fibseg_jax", "monai")}
    result["segment_race_vs_monai"] = (
      timed["monai"]["step_s_median"] / timed["fibseg_jax"]["step_s_median"]
    )
  return result


def main(argv: Sequence[str]) -> None:
  """`python -m fibseg_jax.bench.segment_race FEATURES STEPS Z,Y,X`: the race on its own.

  E.g. `... 16,16,32,64,128,16 2 1,3868,4062` (one paper-size slice, the quick budget's
  widths); prints the result as JSON. Needs torch and monai for the race.
  """
  import json  # noqa: PLC0415
  import sys  # noqa: PLC0415
  import tempfile  # noqa: PLC0415

  from fibseg_jax.bench import machine  # noqa: PLC0415

  if len(argv) != 4:
    sys.exit("usage: python -m fibseg_jax.bench.segment_race FEATURES STEPS Z,Y,X")
  features = tuple(int(v) for v in argv[1].split(","))
  options = Options(peer="monai", steps=int(argv[2]), model_overrides={"features": features})
  the_peer = peer.load_peer(options)
  if the_peer.available:
    peer.torch_setup(the_peer, 0)
  shape = tuple(int(v) for v in argv[3].split(","))
  with tempfile.TemporaryDirectory() as workdir:
    result = measure(options, workdir, the_peer, shape=shape)
  result["load_average_end"] = machine.load_average()
  print(json.dumps(result))


if __name__ == "__main__":
  import sys

  main(sys.argv)
