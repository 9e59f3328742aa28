"""A jitted, device-sharded forward pass over batches of raw tiles.

The tile batch is sharded over a 1-D mesh of this process's devices (axis 'data') and
the variables are replicated. Each process predicts its own blocks independently, so
the mesh holds only local devices and no step waits on another process.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from fibseg_jax import xla
from fibseg_jax.data import augment
from fibseg_jax.infer import settings, tiling

DATA_AXIS = "data"


def tta_transforms(
  tile_yx: Sequence[int], slices: int, passes: int | None = None
) -> list[augment.Symmetry]:
  """The test-time transforms of a tile, in the order a pass count takes them.

  Identity, the x flip, the y flip, both flips (the 4 flips), then the four with an odd
  number of quarter turns (the transposed ones: with the flips, the 8 symmetries of a
  square), then each of those with the slab reversed along z. Quarter turns only for
  square tiles, the reversal only for slabs of several slices, so a tile has 16, 8 or 4.

  Args:
    tile_yx: the tile's (y, x) size.
    slices: the slab depth.
    passes: keep the first `passes` (all when None or more than there are).
  """
  plane = [
    augment.Symmetry(),
    augment.Symmetry(flip_x=True),
    augment.Symmetry(flip_y=True),
    augment.Symmetry(flip_y=True, flip_x=True),
  ]
  if tile_yx[0] == tile_yx[1]:
    plane += [
      augment.Symmetry(turns=1),
      augment.Symmetry(turns=3),
      augment.Symmetry(flip_x=True, turns=1),
      augment.Symmetry(flip_x=True, turns=3),
    ]
  ordered = plane + ([s._replace(reverse=True) for s in plane] if slices > 1 else [])
  return ordered if passes is None else ordered[: max(int(passes), 1)]


def augmented_mean(
  probabilities: Callable[[jax.Array], jax.Array], x: jax.Array, passes: int | None = None
) -> jax.Array:
  """Mean of `probabilities` over the first `passes` test-time transforms of `x`.

  Each transform's output is mapped back before averaging (`tta_transforms`).

  Args:
    probabilities: slab batch `[batch, slices, y, x, channels]` -> `[batch, y, x, classes]`.
    x: the slab batch.
    passes: how many transforms; None: all of them.

  Returns:
    `[batch, y, x, classes]` float32.
  """
  total = None
  transforms = tta_transforms(x.shape[2:4], x.shape[1], passes)
  for symmetry in transforms:
    p = probabilities(augment.apply(x, symmetry, y_axis=2, slab_axis=1, xp=jnp))
    p = augment.undo(p, symmetry, y_axis=1, xp=jnp)
    total = p if total is None else total + p
  return total / len(transforms)


class Ensemble:
  """Several trained models as one: the mean of their class probabilities.

  Quacks like a flax module for `TilePredictor`: `apply(variables, x, train=False)` with
  `variables` a tuple, one entry per member, returns log(mean softmax), whose softmax is
  the mean of the members' probabilities (checkpoint or seed ensembles).

  Attributes:
    members: the flax modules; each maps `[batch, slices, y, x, channels]` to logits
      `[batch, y, x, classes]` with the same classes.
  """

  def __init__(self, members: Sequence[nn.Module]):
    if not members:
      raise tiling.InferenceError("an ensemble needs at least one model")
    self.members = tuple(members)

  def __eq__(self, other: object) -> bool:
    return isinstance(other, Ensemble) and other.members == self.members

  def __hash__(self) -> int:
    return hash(self.members)

  def apply(self, variables: Sequence[Any], x: jax.Array, train: bool = False) -> jax.Array:
    """log of the members' mean softmax `[batch, y, x, classes]` (float32)."""
    if len(variables) != len(self.members):
      raise ValueError(f"{len(variables)} variable sets for {len(self.members)} members")
    total = None
    for member, v in zip(self.members, variables, strict=True):
      p = jax.nn.softmax(member.apply(v, x, train=train).astype(jnp.float32), axis=-1)
      total = p if total is None else total + p
    return jnp.log(jnp.maximum(total / len(self.members), jnp.finfo(jnp.float32).tiny))


def _weighted_probabilities(model, passes, variables, tiles, offset, scale, window):
  """softmax(model(normalised tiles)) averaged over `passes` transforms, times the window."""

  def probabilities(x):
    logits = model.apply(variables, x, train=False)
    return jax.nn.softmax(logits.astype(jnp.float32), axis=-1)

  x = (tiles.astype(jnp.float32) - offset) * scale
  probs = augmented_mean(probabilities, x, passes) if passes > 1 else probabilities(x)
  return probs * window[None, :, :, None]


# One jitted forward per (model, passes, devices), kept for the process: every
# `segment_volume` call (a study segments dozens of times) makes a new `TilePredictor`, and
# a jit of a new bound method would compile the same program again each time (seconds on
# CPU). Flax modules compare by their fields, so the same architecture hits the cache.
_FORWARDS: dict[Any, Callable[..., jax.Array]] = {}


def _compiled_forward(
  model: Any, passes: int, devices: tuple[jax.Device, ...], sharding: NamedSharding
) -> Callable[..., jax.Array]:
  fn = functools.partial(_weighted_probabilities, model, passes)
  options = xla.compiler_options(devices[0].platform)
  try:
    key = (model, passes, devices)
    hash(key)
  except TypeError:  # an unhashable model: compile for this predictor only
    return jax.jit(fn, out_shardings=sharding, compiler_options=options)
  if key not in _FORWARDS:
    _FORWARDS[key] = jax.jit(fn, out_shardings=sharding, compiler_options=options)
  return _FORWARDS[key]


class TilePredictor:
  """Window-weighted class probabilities of a model for batches of raw tiles.

  Tiles go to the devices in their stored dtype (uint16 is half the bytes of float32)
  and are normalised there with the volume's (offset, scale), the same normalisation
  the training loader applies. Compiles once per tile shape and batch size.

  Attributes:
    batch: tiles per device call, a multiple of the device count.
    devices: the devices the batch is sharded over.
  """

  def __init__(
    self,
    model: nn.Module,
    variables: Mapping[str, Any],
    *,
    offset: Sequence[float],
    scale: Sequence[float],
    overlap: int,
    window: str = "cosine",
    batch: int = 8,
    devices: Sequence[jax.Device] | None = None,
    tta: bool | int | str = False,
  ):
    """Places the variables on the devices.

    Args:
      model: flax module (or `Ensemble`); `model.apply(variables, x, train=False)` maps
        `[batch, slices, y, x, channels]` float32 to logits `[batch, y, x, classes]`.
      variables: {'params': ..., maybe 'batch_stats': ...}; for an `Ensemble`, a tuple
        of them, one per member.
      offset: [channels] normalisation offset, x_norm = (x - offset) * scale.
      scale: [channels] normalisation scale.
      overlap: tile overlap in pixels, for the blending window.
      window: "cosine" or "gaussian"; see `tiling.window_1d`.
      batch: tiles per call; rounded up to a multiple of the device count.
      devices: default this process's devices (`jax.local_devices()`).
      tta: test-time augmentation: average the probabilities over the first k
        `tta_transforms` of each tile (flips, quarter turns, the slab reversed), each
        mapped back before averaging; k forward passes a tile. A pass count, True (all),
        False (off) or a `settings.TTA_VALUES` string ("auto": all on an accelerator,
        `settings.AUTO_PASSES` on CPU).

    Raises:
      InferenceError: batch < 1, unknown window or --tta value.
    """
    if batch < 1:
      raise tiling.InferenceError(f"--batch={batch} must be >= 1")
    tiling.window_1d(2, 0, window)  # rejects an unknown kind before anything runs
    self.devices = list(devices or jax.local_devices())
    self.batch = tiling.round_up(batch, len(self.devices))
    self._model = model
    self.passes = settings.tta_passes(tta, self.devices[0].platform)
    self._overlap = overlap
    self._window_kind = window
    mesh = Mesh(np.asarray(self.devices), (DATA_AXIS,))
    self._replicated = NamedSharding(mesh, PartitionSpec())
    self._sharded = NamedSharding(mesh, PartitionSpec(DATA_AXIS))
    # A mapping for one model; a tuple of mappings for an `Ensemble`.
    tree = tuple(dict(v) for v in variables) if isinstance(model, Ensemble) else dict(variables)
    self._variables = jax.device_put(tree, self._replicated)
    self._offset = jax.device_put(np.asarray(offset, np.float32), self._replicated)
    self._scale = jax.device_put(np.asarray(scale, np.float32), self._replicated)
    self._windows: dict[tuple[int, int], tuple[np.ndarray, jax.Array]] = {}
    self._forward = _compiled_forward(model, self.passes, tuple(self.devices), self._sharded)

  def _weighted_probabilities(self, variables, tiles, offset, scale, window):
    """What `_forward` compiles, uncompiled (for inspecting the compiler's options)."""
    return _weighted_probabilities(
      self._model, self.passes, variables, tiles, offset, scale, window
    )

  def window(self, tile_yx: Sequence[int]) -> np.ndarray:
    """The blending window [tile_y, tile_x] float32 applied to tiles of this size."""
    return self._device_window(tile_yx)[0]

  def _device_window(self, tile_yx: Sequence[int]) -> tuple[np.ndarray, jax.Array]:
    key = (int(tile_yx[0]), int(tile_yx[1]))
    if key not in self._windows:
      w = tiling.blend_window(key, self._overlap, self._window_kind)
      self._windows[key] = (w, jax.device_put(w, self._replicated))
    return self._windows[key]

  def output_shape(self, slices: int, tile_yx: Sequence[int], channels: int) -> tuple[int, ...]:
    """Shape of the model's logits for one tile, without running it.

    Returns:
      (batch, y, x, classes) of `model.apply` on `[batch, slices, y, x, channels]`.
    """
    x = jax.ShapeDtypeStruct((self.batch, slices, *tile_yx, channels), jnp.float32)
    out = jax.eval_shape(lambda v, t: self._model.apply(v, t, train=False), self._variables, x)
    return tuple(out.shape)

  def padded_size(self, n: int) -> int:
    """Rows of the device batch for n tiles: the device count times a power of two.

    A region with fewer tiles than `batch` (small slices) then costs about what it
    needs, and at most log2(batch / devices) + 1 batch shapes are ever compiled.
    """
    size = len(self.devices)
    while size < n:
      size *= 2
    return min(size, self.batch)

  def __call__(self, tiles: np.ndarray) -> jax.Array:
    """Starts the forward pass of up to `batch` tiles; returns without waiting.

    Args:
      tiles: [n, slices, y, x, channels] raw tiles (any numeric dtype), n <= batch.

    Returns:
      [padded_size(n), y, x, classes] float32 softmax probabilities times the blending
      window; rows n.. are padding.
    """
    n = tiles.shape[0]
    if n > self.batch:
      raise ValueError(f"{n} tiles exceed the batch of {self.batch}")
    size = self.padded_size(n)
    if n < size:
      pad = np.zeros((size - n, *tiles.shape[1:]), tiles.dtype)
      tiles = np.concatenate([tiles, pad], axis=0)
    _, window = self._device_window(tiles.shape[2:4])
    batch = jax.device_put(tiles, self._sharded)
    return self._forward(self._variables, batch, self._offset, self._scale, window)
