"""The bidirectional ConvLSTM against Keras 3 (jax backend), and the weight conversion."""

import os

os.environ["KERAS_BACKEND"] = "jax"  # must precede the keras import

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import keras  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from fibseg_jax.models import convlstm  # noqa: E402

FILTERS = 4


@pytest.fixture(scope="module")
def keras_layer():
  """Bidirectional(ConvLSTM2D) on [batch=2, slices=3, 6, 5, 3] with random weights."""
  layer = keras.layers.Bidirectional(
    keras.layers.ConvLSTM2D(FILTERS, 3, padding="same", return_sequences=True)
  )
  layer.build((None, 3, 6, 5, 3))
  rng = np.random.default_rng(0)
  # Random biases too, so a wrong gate order or forget-bias offset cannot hide.
  layer.set_weights([rng.normal(0, 0.3, w.shape).astype(np.float32) for w in layer.get_weights()])
  return layer


def test_matches_keras_bidirectional_convlstm2d(keras_layer):
  x = np.random.default_rng(1).normal(size=(2, 3, 6, 5, 3)).astype(np.float32)
  expected = np.asarray(keras_layer(x))

  module = convlstm.BidirectionalConvLSTM(FILTERS, (3, 3))
  params = convlstm.from_keras(keras_layer.get_weights())
  # The converted tree must have exactly the structure and shapes init creates.
  init_shapes = jax.eval_shape(module.init, jax.random.key(0), jnp.asarray(x))["params"]
  assert jax.tree_util.tree_structure(params) == jax.tree_util.tree_structure(init_shapes)
  chex_shapes = jax.tree_util.tree_map(lambda a, b: a.shape == b.shape, params, init_shapes)
  assert all(jax.tree_util.tree_leaves(chex_shapes))

  got = np.asarray(jax.jit(module.apply)({"params": params}, jnp.asarray(x)))
  assert got.shape == (2, 3, 6, 5, 2 * FILTERS)
  # Outputs are tanh-bounded; a gate mix-up gives differences of order 0.1.
  np.testing.assert_allclose(got, expected, atol=1e-5, rtol=0)
  # The backward half really depends on later slices: the first slice differs from a
  # forward-only run over it.
  assert np.abs(got[:, 0, ..., FILTERS:] - got[:, 0, ..., :FILTERS]).max() > 1e-2


def test_to_keras_inverts_from_keras(keras_layer):
  weights = keras_layer.get_weights()
  round_trip = convlstm.to_keras(convlstm.from_keras(weights))
  assert len(round_trip) == len(weights)
  for got, want in zip(round_trip, weights, strict=True):
    np.testing.assert_allclose(got, want, atol=1e-7, rtol=0)


def test_from_keras_without_bias_keeps_forget_gate_neutral():
  rng = np.random.default_rng(2)
  kernel = rng.normal(size=(3, 3, 2, 4 * FILTERS)).astype(np.float32)
  recurrent = rng.normal(size=(3, 3, FILTERS, 4 * FILTERS)).astype(np.float32)
  cell = convlstm.cell_from_keras(kernel, recurrent)
  # Keras without bias has pre-activation 0 for f; flax adds 1, so the bias must be -1.
  np.testing.assert_array_equal(cell["ih"]["bias"][2 * FILTERS : 3 * FILTERS], -1.0)
  np.testing.assert_array_equal(cell["ih"]["bias"][: 2 * FILTERS], 0.0)
  # Keras gate c (third block) is flax gate g (second block).
  np.testing.assert_array_equal(
    cell["ih"]["kernel"][..., FILTERS : 2 * FILTERS], kernel[..., 2 * FILTERS : 3 * FILTERS]
  )


@pytest.mark.parametrize(
  "weights, message",
  [
    ([np.zeros((3, 3, 2, 16))] * 3, "got 3 arrays"),
    (
      [np.zeros((3, 3, 2, 16)), np.zeros((3, 3, 2, 16)), np.zeros(16)] * 2,
      r"recurrent_kernel has shape \(3, 3, 2, 16\); expected \(3, 3, 4, 16\)",
    ),
    (
      [np.zeros((3, 3, 2, 16)), np.zeros((3, 3, 4, 16)), np.zeros(12)] * 2,
      r"bias has shape \(12,\); expected \(16,\)",
    ),
  ],
)
def test_from_keras_rejects_wrong_layouts(weights, message):
  with pytest.raises(convlstm.KerasWeightsError, match=message):
    convlstm.from_keras(weights)
