"""The augmentation maths: the symmetries of a slab and the intensity jitter.

One definition of the symmetry set, used by the training loader (numpy, on views of the
raw patch), the semi-supervised step (`train.state.semi_views`, jax) and test-time
augmentation (`infer.predict.augmented_mean`, jax): a `Symmetry` is the slab reversed
along z, flips of y and x and quarter turns in the y-x plane, always applied in that
order, and `apply` / `undo` take the array module (`numpy` or `jax.numpy`) and the axes.
Quarter turns need square y-x windows; the flips and the reversal fit any shape.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np


class Symmetry(NamedTuple):
  """One element of the symmetry set, applied in field order.

  Attributes:
    reverse: reverse the slices of a slab (its z axis).
    flip_y: flip along y.
    flip_x: flip along x.
    turns: counter-clockwise quarter turns in the y-x plane (y towards x), 0..3.
  """

  reverse: bool = False
  flip_y: bool = False
  flip_x: bool = False
  turns: int = 0


def apply(x: Any, s: Symmetry, *, y_axis: int, slab_axis: int | None = None, xp: Any = np) -> Any:
  """Moves `x` by `s`: reversal (if `slab_axis` is given), flip y, flip x, then turns.

  Args:
    x: an array with y and x at axes `y_axis`, `y_axis + 1` (e.g. a slab [slices, y, x,
      channels] with y_axis=1, slab_axis=0, or labels [y, x] with y_axis=0).
    s: the symmetry.
    y_axis: the y axis; x follows it.
    slab_axis: the slice axis reversed by `s.reverse`; None leaves the slice order alone.
    xp: `numpy` (views of x) or `jax.numpy`.

  Returns:
    x moved; same shape where `s.turns` is even or y and x have the same size.
  """
  if s.reverse and slab_axis is not None:
    x = xp.flip(x, slab_axis)
  if s.flip_y:
    x = xp.flip(x, y_axis)
  if s.flip_x:
    x = xp.flip(x, y_axis + 1)
  if s.turns % 4:
    x = xp.rot90(x, int(s.turns), axes=(y_axis, y_axis + 1))
  return x


def undo(x: Any, s: Symmetry, *, y_axis: int, slab_axis: int | None = None, xp: Any = np) -> Any:
  """The inverse of `apply`: maps an output of the moved input back onto the unmoved one.

  Args and Returns as `apply`; e.g. logits [batch, y, x, classes] with y_axis=1 and no
  slab axis (a model's output has none, so `s.reverse` needs no undoing there).
  """
  if s.turns % 4:
    x = xp.rot90(x, -int(s.turns), axes=(y_axis, y_axis + 1))
  if s.flip_x:
    x = xp.flip(x, y_axis + 1)
  if s.flip_y:
    x = xp.flip(x, y_axis)
  if s.reverse and slab_axis is not None:
    x = xp.flip(x, slab_axis)
  return x


def square_symmetries() -> tuple[Symmetry, ...]:
  """The 8 symmetries of a square in the y-x plane (x flip, then 0-3 quarter turns)."""
  return tuple(Symmetry(flip_x=flip, turns=k) for flip in (False, True) for k in range(4))


def test_time_symmetries(square: bool, slab: bool) -> tuple[Symmetry, ...]:
  """The symmetries averaged over by test-time augmentation, in summation order.

  Args:
    square: the y-x window is square, so quarter turns fit (else 0 or 2 turns, which
      with the x flip are the 4 flips).
    slab: the input has several slices, so the slab reversal counts.

  Returns:
    16, 8 or 4 symmetries: for each reversal, each number of turns k, the x flip off or
    on; "turn k then flip x" is the same permutation as "flip x then turn -k".
  """
  turns = (0, 1, 2, 3) if square else (0, 2)
  reversals = (False, True) if slab else (False,)
  return tuple(
    Symmetry(reverse=z, flip_x=f, turns=(-k) % 4 if f else k)
    for z in reversals
    for k in turns
    for f in (False, True)
  )


def intensity(
  x: np.ndarray,
  norm_offset: np.ndarray,
  norm_scale: np.ndarray,
  gain: np.ndarray,
  offset: np.ndarray,
  gamma: np.ndarray,
) -> None:
  """Normalises and jitters one slab in place.

  x <- (x - norm_offset) * norm_scale, then gamma on the [0, 1] map u = (x + 1) / 2 of the
  normalised range, leaving values outside [0, 1] as they are (u**g is 0 and 1 at the
  ends, so the curve stays continuous and hot pixels keep their excess), then
  x <- x * gain + offset.

  Args:
    x: [slices, patch, patch, channels] float32 raw intensities, modified in place.
    norm_offset, norm_scale: [channels] the volume's normalisation.
    gain, offset, gamma: [channels] this sample's jitter (1, 0, 1: none).
  """
  x -= norm_offset
  x *= norm_scale
  if (gamma != 1).any():
    # u**g - u is 0 wherever u is clipped, so adding it leaves out-of-range values alone.
    u = np.clip(x, -1, 1)
    u += 1
    u *= 0.5
    # exp(g log u) is the same curve, and numpy's float32 exp and log are vectorised
    # where its power is not (about 1.4x faster here).
    with np.errstate(divide="ignore"):
      bend = np.log(u)
    bend *= gamma
    np.exp(bend, out=bend)
    bend -= u
    bend *= 2
    x += bend
  if (gain != 1).any():
    x *= gain
  if (offset != 0).any():
    x += offset
