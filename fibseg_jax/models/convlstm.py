"""Bidirectional convolutional LSTM along the slice axis, and weight import from Keras.

`BidirectionalConvLSTM` is flax's `nn.ConvLSTMCell` run forward and backward over the
slices with `nn.RNN` / `nn.Bidirectional`, outputs concatenated [forward, backward]. It
computes what Keras 3 computes with

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

    def cell(name: str) -> nn.ConvLSTMCell:
      return nn.ConvLSTMCell(self.features, tuple(self.kernel_size), dtype=self.dtype, name=name)

    bidirectional = nn.Bidirectional(nn.RNN(cell("forward")), nn.RNN(cell("backward")))
    return bidirectional(x).astype(self.dtype)


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
