"""Bidirectional convolutional LSTM along the slice axis, and weight import from Keras.

`BidirectionalConvLSTM` computes flax's `nn.ConvLSTMCell` run forward and backward over
the slices (what `nn.Bidirectional(nn.RNN(cell), nn.RNN(cell))` computes, with the same
parameters), outputs concatenated [forward, backward], written so that XLA runs it at the
speed of its convolutions (see `ConvLSTMDirection`). It computes what Keras 3 computes with

  Bidirectional(ConvLSTM2D(features, kernel_size, padding="same", return_sequences=True))

once the weights are converted with `from_keras`: Keras orders the gates (i, f, c, o)
with one bias, flax orders them (i, g, f, o) with an input and a hidden bias and adds 1
to the forget gate inside the cell.

Parameters of the module: {'forward': cell, 'backward': cell}, a cell being
{'ih': {'kernel': [kh, kw, in, 4F], 'bias': [4F]}, 'hh': {'kernel': [kh, kw, F, 4F],
'bias': [4F]}}.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

# Keras gate blocks (i, f, c, o) in the order flax's cell splits them (i, g, f, o).
_KERAS_TO_FLAX_GATES = (0, 2, 1, 3)
_FORGET = 2  # index of the forget gate in flax's order


class KerasWeightsError(ValueError):
  """Keras weights do not have the layout of a (Bidirectional) ConvLSTM2D."""


class _ConvWeights(nn.Module):
  """The `kernel` [kh, kw, in, out] and `bias` [out] of an `nn.Conv`, without applying it.

  The same names, shapes and initialisers as `nn.Conv(out, (kh, kw))`, so the params of
  a cell read `{'ih': {'kernel', 'bias'}, 'hh': {'kernel', 'bias'}}` as flax's
  `nn.ConvLSTMCell` has them, while the caller decides how to apply the convolutions.
  """

  shape: tuple[int, int, int, int]

  @nn.compact
  def __call__(self) -> tuple[jax.Array, jax.Array]:
    kernel = self.param("kernel", nn.linear.default_kernel_init, self.shape, jnp.float32)
    bias = self.param("bias", nn.initializers.zeros_init(), (self.shape[-1],), jnp.float32)
    return kernel, bias


def _conv_same(x: jax.Array, kernel: jax.Array) -> jax.Array:
  """Stride-1 "SAME" convolution of `x: [batch, y, x, in]` with `kernel: [kh, kw, in, out]`."""
  return jax.lax.conv_general_dilated(
    x, kernel.astype(x.dtype), (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
  )


class ConvLSTMDirection(nn.Module):
  """One direction of the ConvLSTM: flax's `nn.ConvLSTMCell` run over the slices.

  Computes exactly what `nn.RNN(nn.ConvLSTMCell(features, kernel_size))` computes (zero
  initial state, gates (i, g, f, o), forget bias +1), organised for speed: the
  input-to-hidden convolution of every slice is one convolution over the slices folded
  into the batch, outside the recurrence; the recurrence is unrolled over the (few,
  static) slices, so XLA sees plain convolutions instead of a while loop (on XLA:CPU the
  scan's backward pass was ~30x slower, see BUILD_NOTES.md); and the first step skips the
  hidden-to-hidden convolution of the zero state, leaving its bias.

  Attributes:
    features: hidden channels.
    kernel_size: (ky, kx) of both convolutions ("SAME" padding).
    reverse: run from the last slice to the first (outputs stay aligned with the input).
    dtype: compute dtype of the convolutions; gates and cell state are float32.
  """

  features: int
  kernel_size: tuple[int, int] = (3, 3)
  reverse: bool = False
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """Runs the cell over the slices.

    Args:
      x: `[batch, slices, y, x, channels]`.

    Returns:
      float32 hidden states `[batch, slices, y, x, features]`, aligned with the input.
    """
    batch, slices, y, x_size, channels = x.shape
    ky, kx = self.kernel_size
    gates_width = 4 * self.features
    ih_kernel, ih_bias = _ConvWeights((ky, kx, channels, gates_width), name="ih")()
    hh_kernel, hh_bias = _ConvWeights((ky, kx, self.features, gates_width), name="hh")()
    folded = x.reshape(batch * slices, y, x_size, channels).astype(self.dtype)
    from_input = _conv_same(folded, ih_kernel).astype(jnp.float32) + (ih_bias + hh_bias)
    from_input = from_input.reshape(batch, slices, y, x_size, gates_width)

    order = range(slices - 1, -1, -1) if self.reverse else range(slices)
    hidden: list[jax.Array | None] = [None] * slices
    h = c = None
    for t in order:
      gates = from_input[:, t]
      if h is not None:
        gates = gates + _conv_same(h.astype(self.dtype), hh_kernel).astype(jnp.float32)
      i, g, f, o = jnp.split(gates, 4, axis=-1)
      c_new = jax.nn.sigmoid(i) * jnp.tanh(g)
      c = c_new if c is None else jax.nn.sigmoid(f + 1.0) * c + c_new
      h = jax.nn.sigmoid(o) * jnp.tanh(c)
      hidden[t] = h
    return jnp.stack(hidden, axis=1)


class BidirectionalConvLSTM(nn.Module):
  """ConvLSTM over the slice axis in both directions, outputs concatenated.

  Attributes:
    features: hidden channels of each direction; the output has twice as many.
    kernel_size: (ky, kx) of the input and recurrent convolutions ("SAME" padding).
    dtype: compute dtype of the convolutions; the cell state is kept in float32.
  """

  features: int
  kernel_size: tuple[int, int] = (3, 3)
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """Runs the two LSTMs along the slices.

    Args:
      x: `[batch, slices, y, x, channels]`.

    Returns:
      `[batch, slices, y, x, 2 * features]` in `dtype`: forward then backward states,
      both aligned with the input slices.
    """
    kernel = tuple(self.kernel_size)
    forward = ConvLSTMDirection(self.features, kernel, dtype=self.dtype, name="forward")(x)
    backward = ConvLSTMDirection(
      self.features, kernel, reverse=True, dtype=self.dtype, name="backward"
    )(x)
    return jnp.concatenate([forward, backward], axis=-1).astype(self.dtype)


def _split_gates(a: np.ndarray) -> list[np.ndarray]:
  return np.split(a, 4, axis=-1)


def cell_from_keras(
  kernel: np.ndarray, recurrent_kernel: np.ndarray, bias: np.ndarray | None = None
) -> dict[str, Any]:
  """Converts the weights of one Keras ConvLSTM2D to flax `nn.ConvLSTMCell` params.

  Args:
    kernel: `[ky, kx, in_channels, 4 * filters]`, gates (i, f, c, o).
    recurrent_kernel: `[ky, kx, filters, 4 * filters]`.
    bias: `[4 * filters]`, or None for `use_bias=False`.

  Returns:
    {'ih': {'kernel', 'bias'}, 'hh': {'kernel', 'bias'}} as float32 numpy arrays.

  Raises:
    KerasWeightsError: the shapes do not belong together.
  """
  kernel, recurrent_kernel = np.asarray(kernel), np.asarray(recurrent_kernel)
  if kernel.ndim != 4 or kernel.shape[-1] % 4:
    raise KerasWeightsError(
      f"ConvLSTM2D kernel has shape {kernel.shape}; expected [ky, kx, in, 4 * filters]"
    )
  filters = kernel.shape[-1] // 4
  expected = (*kernel.shape[:2], filters, 4 * filters)
  if recurrent_kernel.shape != expected:
    raise KerasWeightsError(
      f"ConvLSTM2D recurrent_kernel has shape {recurrent_kernel.shape}; expected {expected} "
      f"for a kernel of shape {kernel.shape}"
    )
  bias = np.zeros(4 * filters) if bias is None else np.asarray(bias)
  if bias.shape != (4 * filters,):
    raise KerasWeightsError(f"ConvLSTM2D bias has shape {bias.shape}; expected ({4 * filters},)")

  def reorder(a: np.ndarray) -> np.ndarray:
    gates = _split_gates(a)
    return np.concatenate([gates[k] for k in _KERAS_TO_FLAX_GATES], axis=-1).astype(np.float32)

  ih_bias = _split_gates(reorder(bias))
  ih_bias[_FORGET] = ih_bias[_FORGET] - 1.0  # flax adds the 1 back inside the cell
  return {
    "ih": {"kernel": reorder(kernel), "bias": np.concatenate(ih_bias)},
    "hh": {"kernel": reorder(recurrent_kernel), "bias": np.zeros(4 * filters, np.float32)},
  }


def from_keras(weights: Sequence[np.ndarray]) -> dict[str, Any]:
  """Converts Keras `Bidirectional(ConvLSTM2D(...))` weights to `BidirectionalConvLSTM`.

  Keras must use its defaults `activation="tanh"`, `recurrent_activation="sigmoid"`,
  `padding="same"`, strides and dilation 1 and `merge_mode="concat"`.

  Args:
    weights: `layer.get_weights()` of the Keras layer: forward (kernel,
      recurrent_kernel, bias) then backward (same), 6 arrays; 4 without biases.

  Returns:
    The params of a `BidirectionalConvLSTM` ({'forward': ..., 'backward': ...}), to put
    under the module's name in a model's params.

  Raises:
    KerasWeightsError: not 4 or 6 arrays, or shapes that do not fit a ConvLSTM2D.
  """
  weights = list(weights)
  if len(weights) not in (4, 6):
    raise KerasWeightsError(
      f"got {len(weights)} arrays; a Keras Bidirectional(ConvLSTM2D) has 6 (forward kernel, "
      "recurrent_kernel, bias, then backward) or 4 with use_bias=False"
    )
  half = len(weights) // 2
  return {
    "forward": cell_from_keras(*weights[:half]),
    "backward": cell_from_keras(*weights[half:]),
  }


def cell_to_keras(cell: dict[str, Any]) -> list[np.ndarray]:
  """Inverse of `cell_from_keras`: flax cell params -> [kernel, recurrent_kernel, bias]."""
  flax_to_keras = np.argsort(_KERAS_TO_FLAX_GATES)

  def reorder(a: np.ndarray) -> np.ndarray:
    gates = _split_gates(np.asarray(a, np.float32))
    return np.concatenate([gates[k] for k in flax_to_keras], axis=-1)

  bias = _split_gates(np.asarray(cell["ih"]["bias"], np.float32) + np.asarray(cell["hh"]["bias"]))
  bias[_FORGET] = bias[_FORGET] + 1.0
  return [
    reorder(cell["ih"]["kernel"]),
    reorder(cell["hh"]["kernel"]),
    reorder(np.concatenate(bias)),
  ]


def to_keras(params: dict[str, Any]) -> list[np.ndarray]:
  """Inverse of `from_keras`: `BidirectionalConvLSTM` params -> Keras `set_weights` list."""
  return cell_to_keras(params["forward"]) + cell_to_keras(params["backward"])
