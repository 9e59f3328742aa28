"""U-Net and Sensor-3D: configs, input checks, shapes, dtypes, gradients, parameter counts."""

import dataclasses
import functools
from typing import Any

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from fibseg_jax import models
from fibseg_jax.models import layers

UNET = {"name": "unet", "num_classes": 3, "depth": 2, "features": (4, 8, 16)}
SENSOR3D = {"name": "sensor3d", "num_classes": 3, "depth": 2, "features": (4, 8, 16)}
SLAB = (2, 3, 32, 32, 2)  # [batch, slices, y, x, channels]


def slab(shape=SLAB, seed=0):
  """A random slab batch `[batch, slices, y, x, channels]`, made on the host.

  Inputs and comparisons stay in numpy: every eager jnp op on a new shape is one more
  XLA compile, seconds each on a busy 2-core machine.
  """
  return np.random.default_rng(seed).standard_normal(shape, np.float32)


def max_abs(a, b=0.0):
  return float(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64)).max())


def shifted(x, s, by=3.0):
  """`x` with slice `s` brightened by `by`."""
  x = np.array(x)
  x[:, s] += by
  return x


# --- parameter counts --------------------------------------------------------------


def test_default_unet_has_monai_basicunet_parameter_count():
  model = models.build(models.default_config("unet"))
  x = jax.ShapeDtypeStruct((1, 3, 64, 64, 2), jnp.float32)  # 3 slices x 2 channels = 6 in
  variables = jax.eval_shape(lambda x: model.init(jax.random.key(0), x), x)
  # monai.networks.nets.BasicUNet(spatial_dims=2, in_channels=6, out_channels=4)
  assert models.count_params(variables) == 1_979_972
  assert models.size_multiple(models.default_config("unet")) == 16


def test_unet_parameter_count_with_one_width_per_level():
  model = models.build(UNET)  # in = 3 slices x 2 channels = 6
  variables = jax.eval_shape(lambda x: model.init(jax.random.key(0), x), slab())

  def two_conv(cin, cout):  # 3x3 conv + bias, instance norm scale + bias, twice
    return 9 * cin * cout + 3 * cout + 9 * cout * cout + 3 * cout

  def up(cin, cup):  # 2x2 transposed conv + bias
    return 4 * cin * cup + cup

  expected = (
    two_conv(6, 4)
    + two_conv(4, 8)
    + two_conv(8, 16)
    + up(16, 8)  # halves 16 -> 8, concatenated with the 8-wide skip
    + two_conv(16, 8)
    + up(8, 4)
    + two_conv(8, 4)
    + 4 * 3
    + 3  # 1x1 head
  )
  assert models.count_params(variables) == expected == 7747
  assert models.count_params(variables["params"]) == expected


def test_sensor3d_parameter_count_includes_both_lstm_directions():
  model = models.build(SENSOR3D)
  variables = jax.eval_shape(lambda x: model.init(jax.random.key(0), x), slab())

  def bilstm(cin, hidden):  # input and hidden 3x3 convs to 4 gates, both with bias
    return 2 * (9 * cin * 4 * hidden + 4 * hidden + 9 * hidden * 4 * hidden + 4 * hidden)

  # Shared per-slice layers see only the 2 channels of one slice.
  backbone = 240 + 912 + 3552 + (520 + 1776) + (132 + 456) + 15
  assert models.count_params(variables) == backbone + bilstm(16, 8) + bilstm(4, 2)
  assert set(variables["params"]) >= {"lstm0", "lstm2"}


# --- shapes and dtypes for every option (traced only) ------------------------------

OPTIONS = [
  {},
  {"norm": "batch"},
  {"norm": "group", "norm_groups": 2},
  {"norm": "none"},
  {"upsample": "resize"},
  {"activation": "gelu"},
  {"activation": "relu", "conv_bias": False},
  {"dropout": 0.3},
  {"dtype": "bfloat16"},
  {"dtype": "bfloat16", "norm": "batch", "upsample": "resize"},
  {"features": (4, 8, 16, 6)},
  {"depth": 3, "features": (4, 8, 8, 16)},
]
# The 2D blocks are shared, so Sensor-3D is traced with the options that change its own
# code paths (norm state, dtype through the LSTMs, widths, LSTM placement).
SENSOR3D_OPTIONS = [
  {},
  {"dtype": "bfloat16", "norm": "batch", "upsample": "resize"},
  {"features": (4, 8, 16, 6)},
  {"lstm_levels": ()},
  {"lstm_levels": (0, 1, 2)},
  {"lstm_levels": (-2,), "lstm_kernel": 1},
]


@pytest.mark.parametrize(
  "config",
  [{**UNET, **o} for o in OPTIONS] + [{**SENSOR3D, **o} for o in SENSOR3D_OPTIONS],
  ids=lambda c: c["name"] + "-" + "-".join(f"{k}={v}" for k, v in c.items() if k != "name"),
)
def test_output_shapes_and_dtypes(config):
  model = models.build(config)
  x = jax.ShapeDtypeStruct(SLAB, jnp.float32)
  variables = jax.eval_shape(lambda x: model.init(jax.random.key(0), x), x)
  for leaf in jax.tree_util.tree_leaves(variables):
    assert leaf.dtype == jnp.float32  # float32 params even for bfloat16 compute
  assert ("batch_stats" in variables) == (config.get("norm") == "batch")

  logits = jax.eval_shape(lambda v, x: model.apply(v, x, train=False), variables, x)
  chex.assert_shape(logits, (2, 32, 32, 3))
  assert logits.dtype == jnp.float32

  logits, updates = jax.eval_shape(
    lambda v, x: model.apply(
      v, x, train=True, mutable=["batch_stats"], rngs={"dropout": jax.random.key(1)}
    ),
    variables,
    x,
  )
  chex.assert_shape(logits, (2, 32, 32, 3))
  assert set(updates) == ({"batch_stats"} if "batch_stats" in variables else set())


@pytest.mark.parametrize("name", ["unet", "sensor3d"])
@pytest.mark.parametrize("slices", [1, 3, 5])
def test_any_odd_slice_count(name, slices):
  model = models.build(
    {**(UNET if name == "unet" else SENSOR3D), "depth": 3, "features": (4, 8, 8, 16)}
  )
  x = jax.ShapeDtypeStruct((1, slices, 24, 40, 2), jnp.float32)  # y, x multiples of 8
  variables = jax.eval_shape(lambda x: model.init(jax.random.key(0), x), x)
  logits = jax.eval_shape(lambda v, x: model.apply(v, x), variables, x)
  chex.assert_shape(logits, (1, 24, 40, 3))


def test_sensor3d_all_slices_shape():
  model = models.build(SENSOR3D)
  x = jax.ShapeDtypeStruct((2, 5, 16, 8, 2), jnp.float32)
  variables = jax.eval_shape(lambda x: model.init(jax.random.key(0), x), x)
  logits = jax.eval_shape(lambda v, x: model.apply(v, x, all_slices=True), variables, x)
  chex.assert_shape(logits, (2, 5, 16, 8, 3))
  assert logits.dtype == jnp.float32


# --- real computation ----------------------------------------------------------------
# XLA compiles take most of this file's time on 2 CPU cores, so the tests below share
# two small models and their compiled functions.

UNET_RUN = {
  **UNET,
  "depth": 1,
  "features": (4, 8),
  "norm": "batch",
  "dropout": 0.2,
  "upsample": "resize",
}
# Dropout layers are exercised by the U-Net run; in this one they would double the compile.
SENSOR3D_RUN = {"name": "sensor3d", "num_classes": 3, "depth": 1, "features": (4, 8)}


@dataclasses.dataclass
class Compiled:
  """A model, its initialised variables and jitted init / evaluate / training step."""

  model: Any
  x: np.ndarray
  variables: Any
  init: Any
  evaluate: Any
  step: Any


def loss_fn(params, other, model, x, dropout_key):
  logits, updates = model.apply(
    {"params": params, **other},
    x,
    train=True,
    mutable=["batch_stats"],
    rngs={"dropout": dropout_key},
  )
  return jnp.mean(jax.nn.log_softmax(logits)[..., 0] ** 2), (logits, updates)


def fast_prng(fn):
  """`fn` with random bits from the non-partitionable threefry.

  The default (partitionable) threefry is unrolled once per parameter and per dropout
  layer; on 2 busy CPU cores it adds 10-50 s of XLA compile time even for these tiny
  models. The model code and what the tests check are the same either way.
  """

  @functools.wraps(fn)
  def wrapped(*args, **kwargs):
    with jax.threefry_partitionable(False):
      return fn(*args, **kwargs)

  return wrapped


def compiled(config, shape):
  model = models.build(config)
  x = slab(shape)
  init = fast_prng(jax.jit(functools.partial(model.init, train=False)))
  return Compiled(
    model=model,
    x=x,
    variables=init(jax.random.key(0), x),
    init=init,
    evaluate=jax.jit(model.apply, static_argnames=("train", "all_slices")),
    step=fast_prng(jax.jit(jax.value_and_grad(loss_fn, has_aux=True), static_argnums=2)),
  )


@pytest.fixture(scope="module")
def unet_run():
  return compiled(UNET_RUN, (2, 3, 16, 16, 2))


@pytest.fixture(scope="module")
def sensor3d_run():
  return compiled(SENSOR3D_RUN, (2, 5, 16, 16, 2))


@pytest.mark.parametrize("run_name", ["unet_run", "sensor3d_run"])
def test_training_gradients_finite_and_deterministic(run_name, request):
  run = request.getfixturevalue(run_name)
  params = run.variables["params"]
  other = {k: v for k, v in run.variables.items() if k != "params"}

  (loss, (logits, updates)), grads = jax.device_get(
    run.step(params, other, run.model, run.x, jax.random.key(1))
  )
  assert np.isfinite(loss)
  chex.assert_tree_all_finite(grads)
  scale = max(max_abs(g) for g in jax.tree_util.tree_leaves(grads))
  for path, g in jax.tree_util.tree_leaves_with_path(grads):
    keys = [k.key for k in path]
    if keys[-2:] in (["conv0", "bias"], ["conv1", "bias"]):
      # The norm right after these convolutions removes any per-channel constant.
      assert max_abs(g) < 1e-5 * scale, jax.tree_util.keystr(path)
    else:
      # Every other parameter, LSTMs and norm parameters included, drives the loss.
      assert max_abs(g) > 1e-5 * scale, jax.tree_util.keystr(path)

  if run.model.config.norm == "batch":
    moved = jax.tree_util.tree_map(
      max_abs, updates["batch_stats"], jax.device_get(other["batch_stats"])
    )
    assert min(jax.tree_util.tree_leaves(moved)) > 0
  else:
    assert updates == {}

  # Same keys: bitwise the same; another dropout key: other logits (with dropout).
  (_, (logits2, _)), grads2 = jax.device_get(
    run.step(params, other, run.model, run.x, jax.random.key(1))
  )
  np.testing.assert_array_equal(logits, logits2)
  chex.assert_trees_all_equal(grads, grads2)
  (_, (logits3, _)), _ = run.step(params, other, run.model, run.x, jax.random.key(2))
  assert (max_abs(logits, logits3) > 1e-3) == (run.model.config.dropout > 0)

  # Evaluation ignores dropout (no rng needed) and repeats exactly.
  first = run.evaluate(run.variables, run.x, train=False)
  chex.assert_shape(first, (2, 16, 16, 3))
  np.testing.assert_array_equal(first, run.evaluate(run.variables, run.x, train=False))


def test_init_is_deterministic_in_the_key(unet_run):
  again = unet_run.init(jax.random.key(0), unet_run.x)
  other = unet_run.init(jax.random.key(1), unet_run.x)
  chex.assert_trees_all_equal(unet_run.variables, again)
  kernels = [v["params"]["down0"]["conv0"]["kernel"] for v in (unet_run.variables, other)]
  assert max_abs(*kernels) > 0


@pytest.mark.parametrize("run_name", ["unet_run", "sensor3d_run"])
def test_bfloat16_compute_close_to_float32(run_name, request):
  run = request.getfixturevalue(run_name)
  model16 = models.build(dataclasses.replace(run.model.config, dtype="bfloat16"))
  logits32 = run.evaluate(run.variables, run.x, train=False)
  logits16 = jax.jit(model16.apply)(run.variables, run.x)  # the same float32 params
  assert logits16.dtype == jnp.float32
  scale = max_abs(logits32)
  error = max_abs(logits16, logits32)
  # bfloat16 keeps 8 bits of mantissa: errors of a few percent, not zero, not garbage.
  assert 0 < error < 0.1 * scale


def test_unet_uses_every_slice(unet_run):
  base = unet_run.evaluate(unet_run.variables, unet_run.x, train=False)
  for s in (0, 2):  # the slices either side of the central one
    changed = unet_run.evaluate(unet_run.variables, shifted(unet_run.x, s), train=False)
    assert max_abs(changed, base) > 1e-3


def test_sensor3d_central_slice_and_slice_coupling(sensor3d_run):
  run = sensor3d_run
  x, variables = run.x, run.variables
  # Change only slice 0, two slices from the central slice 2.
  x_other = shifted(x, 0)

  central = run.evaluate(variables, x, train=False)
  every = run.evaluate(variables, x, train=False, all_slices=True)
  chex.assert_shape(every, (2, 5, 16, 16, 3))
  np.testing.assert_allclose(central, every[:, 2], atol=1e-6)
  # The LSTMs carry slice 0 to the central slice.
  assert max_abs(run.evaluate(variables, x_other, train=False), central) > 1e-4

  # Without LSTMs the shared 2D network segments every slice on its own.
  plain = models.build(dataclasses.replace(run.model.config, lstm_levels=()))
  plain_vars = {"params": {k: v for k, v in variables["params"].items() if "lstm" not in k}}
  apply_all = jax.jit(functools.partial(plain.apply, all_slices=True))
  every = apply_all(plain_vars, x)
  every_other = apply_all(plain_vars, x_other)
  np.testing.assert_array_equal(every[:, 1:], every_other[:, 1:])
  assert max_abs(every[:, 0], every_other[:, 0]) > 1e-4
  # Shared weights: a slice gets the same logits wherever it sits in the slab.
  moved = np.array(x)
  moved[:, 3] = x[:, 1]
  every_moved = apply_all(plain_vars, moved)
  np.testing.assert_allclose(every_moved[:, 3], every[:, 1], atol=1e-5)


# --- input checks ------------------------------------------------------------------


@pytest.mark.parametrize(
  "slices, y, x, message",
  [
    (3, 500, 512, "y=500 is not a multiple of 16 for depth 4; nearest valid sizes: 496, 512"),
    (3, 512, 8, "x=8 is not a multiple of 16 for depth 4; nearest valid sizes: 16$"),
    (4, 512, 512, "slices=4: a slab needs an odd number of slices"),
    (0, 512, 512, "slices=0"),
  ],
)
def test_check_input_shape_names_nearest_valid_sizes(slices, y, x, message):
  with pytest.raises(models.InputShapeError, match=message):
    models.check_input_shape({"name": "unet"}, slices, y, x)


def test_check_input_shape_accepts_valid_sizes():
  models.check_input_shape({"name": "sensor3d"}, 5, 24, 8)  # depth 3: multiples of 8


@pytest.mark.parametrize("name", ["unet", "sensor3d"])
@pytest.mark.parametrize(
  "shape, message",
  [
    ((1, 3, 30, 32, 2), "y=30 is not a multiple of 4 for depth 2; nearest valid sizes: 28, 32"),
    ((1, 2, 32, 32, 2), "slices=2"),
    ((1, 32, 32, 2), r"expected a slab batch \[batch, slices, y, x, channels\]"),
  ],
)
def test_modules_check_their_input(name, shape, message):
  model = models.build(UNET if name == "unet" else SENSOR3D)
  x = jax.ShapeDtypeStruct(shape, jnp.float32)
  with pytest.raises(models.InputShapeError, match=message):
    jax.eval_shape(lambda x: model.init(jax.random.key(0), x), x)


# --- configs -----------------------------------------------------------------------


@pytest.mark.parametrize("name", ["unet", "sensor3d"])
def test_default_config_round_trips(name):
  fields = models.default_config(name)
  assert fields["name"] == name
  config = models.config_from(fields)
  assert config == models.MODELS[name][0]()
  # As an experiment config holds it: ConfigDict, lists from the command line or JSON.
  as_configdict = ml_collections.ConfigDict(
    {k: list(v) if isinstance(v, tuple) else v for k, v in fields.items()}
  )
  assert models.config_from(as_configdict) == config
  assert models.build(as_configdict).config == config
  assert models.build(config).config is config


def test_sensor3d_default_size_and_levels():
  config = models.Sensor3DConfig()
  assert (config.depth, config.features) == (3, (16, 32, 64, 128))
  assert config.resolved_lstm_levels == {0, 3}
  assert models.size_multiple(config) == 8


def test_build_accepts_partial_mapping_and_keeps_defaults():
  model = models.build({"name": "unet", "num_classes": 7, "norm": "batch"})
  assert isinstance(model, models.UNet)
  assert model.config == dataclasses.replace(models.UNetConfig(), num_classes=7, norm="batch")


@pytest.mark.parametrize(
  "config, message",
  [
    ({"num_classes": 3}, r"model.name=None is not one of \('unet', 'sensor3d'\)"),
    ({"name": "unet3d"}, "model.name='unet3d' is not one of"),
    (
      {"name": "unet", "featurs": [8], "lstm_levels": [0]},
      r"has no field\(s\) \['featurs', 'lstm_levels'\]; valid fields: \['name', 'num_classes'",
    ),
    ({"name": "unet", "norm": "layer"}, r"model.norm='layer' is not one of \('batch'"),
    ({"name": "unet", "upsample": "nearest"}, "model.upsample='nearest'"),
    ({"name": "unet", "activation": "tanh"}, "model.activation='tanh'"),
    ({"name": "unet", "dtype": "float16"}, "model.dtype='float16'"),
    ({"name": "unet", "dropout": 1.0}, r"model.dropout=1.0 must be a rate in \[0, 1\)"),
    ({"name": "unet", "num_classes": 0}, "model.num_classes=0 must be a positive integer"),
    ({"name": "unet", "depth": 2, "features": [8, 16]}, "has 2 entries; depth 2 needs 3"),
    ({"name": "unet", "depth": 1, "features": [8, 0]}, r"model.features\[1\]=0"),
    (
      {"name": "unet", "norm": "group", "norm_groups": 8, "features": [8, 12, 16, 32, 64, 8]},
      r"model.norm_groups=8 does not divide the widths \[12\]",
    ),
    ({"name": "sensor3d", "lstm_levels": [4]}, r"has 4; levels of depth 3 are 0..3"),
    ({"name": "sensor3d", "lstm_levels": [3, -1]}, "names a level twice"),
    (
      {"name": "sensor3d", "depth": 1, "features": [3, 5], "lstm_levels": [1]},
      r"level\(s\) \[1\] have odd widths \[5\]",
    ),
    ({"name": "sensor3d", "lstm_kernel": 2}, "model.lstm_kernel=2 must be an odd"),
  ],
)
def test_config_errors_name_the_field(config, message):
  with pytest.raises(models.ModelConfigError, match=message):
    models.build(config)


def test_config_errors_are_value_errors():
  assert issubclass(models.ModelConfigError, ValueError)
  assert issubclass(models.InputShapeError, ValueError)
  with pytest.raises(models.ModelConfigError, match="mapping with a 'name' key"):
    models.build("unet")
  with pytest.raises(models.ModelConfigError, match="model.name='vnet'"):
    models.default_config("vnet")


def test_count_params_ignores_batch_stats():
  model = models.build({**UNET, "norm": "batch"})
  variables = jax.eval_shape(lambda x: model.init(jax.random.key(0), x), slab())
  assert models.count_params(variables) == models.count_params(variables["params"])
  assert models.count_params(variables["batch_stats"]) > 0


def test_transposed_conv_2x2_equals_flax_conv_transpose():
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 5, 7, 6))
  reference = nn.ConvTranspose(4, (2, 2), strides=(2, 2), padding="VALID")
  variables = reference.init(jax.random.PRNGKey(1), x)
  variables = jax.tree.map(lambda a: a + 0.1, variables)  # a non-zero bias too
  ours = layers.TransposedConv2x2(4)
  assert jax.tree.map(jnp.shape, ours.init(jax.random.PRNGKey(2), x)) == jax.tree.map(
    jnp.shape, variables
  )
  np.testing.assert_allclose(
    ours.apply(variables, x), reference.apply(variables, x), rtol=1e-5, atol=1e-5
  )
