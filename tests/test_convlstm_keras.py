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


@pytest.mark.parametrize("slices", [1, 3, 5])
def test_equals_flax_rnn_of_convlstm_cells(slices):
  """The unrolled, hoisted recurrence computes what flax's own RNN of cells computes."""
  import flax.linen as nn  # noqa: PLC0415

  class Reference(nn.Module):  # the library's implementation before it was unrolled
    @nn.compact
    def __call__(self, x):
      cell = lambda name: nn.ConvLSTMCell(FILTERS, (3, 3), name=name)  # noqa: E731
      return nn.Bidirectional(nn.RNN(cell("forward")), nn.RNN(cell("backward")))(x)

  reference = Reference()
  x = jnp.asarray(np.random.default_rng(3).normal(size=(2, slices, 6, 5, 3)), jnp.float32)
  ref_params = reference.init(jax.random.key(0), x)["params"]
  module = convlstm.BidirectionalConvLSTM(FILTERS, (3, 3))
  params = module.init(jax.random.key(0), x)["params"]
  # Same tree (names, shapes); the weights are flax's, with random biases so that the
  # hidden-to-hidden bias of the skipped first-step convolution cannot hide.
  rng = np.random.default_rng(4)
  ref_params = jax.tree.map(lambda a: jnp.asarray(rng.normal(0, 0.3, a.shape), a.dtype), ref_params)
  assert jax.tree.structure(params) == jax.tree.structure(ref_params)
  assert jax.tree.map(jnp.shape, params) == jax.tree.map(jnp.shape, ref_params)
  want = reference.apply({"params": ref_params}, x)
  got = module.apply({"params": ref_params}, x)
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5, rtol=0)
  grad = lambda m: jax.grad(lambda p: jnp.sum(m.apply({"params": p}, x) ** 2))(ref_params)
  got_grads, want_grads = jax.tree.leaves(grad(module)), jax.tree.leaves(grad(reference))
  for g_got, g_want in zip(got_grads, want_grads, strict=True):
    np.testing.assert_allclose(np.asarray(g_got), np.asarray(g_want), atol=1e-4, rtol=1e-4)
