"""Deep supervision (nnU-Net): heads on the lower decoder levels, in training only."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_train import make_volume, tiny_config

from fibseg_jax import checkpoint, infer, models
from fibseg_jax.train import config as config_lib
from fibseg_jax.train import loop, losses, metrics_writer
from fibseg_jax.train import state as state_lib

CONFIGS = {
  "unet": {"name": "unet", "num_classes": 3, "depth": 3, "features": (4, 8, 8, 8), "norm": "batch"},
  "sensor3d": {
    "name": "sensor3d",
    "num_classes": 3,
    "depth": 3,
    "features": (2, 4, 4, 4),
    "lstm_levels": (1,),  # on a supervised level: its head reads the LSTM's output
  },
}
X = jnp.asarray(np.random.default_rng(0).normal(size=(2, 3, 16, 16, 2)), jnp.float32)


def _init(model, deep_supervision):
  extra = {"deep_supervision": True} if deep_supervision else {}
  return model.init(jax.random.PRNGKey(0), X, train=False, **extra)


def _count_without_heads(model):
  """Parameters of the model initialised as for inference (shapes only, nothing runs)."""
  return models.count_params(jax.eval_shape(lambda: _init(model, False)))


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_heads_exist_in_training_only_and_inference_is_unchanged(name):
  model = models.build(CONFIGS[name])
  deep = _init(model, True)
  # One head per supervised level below the top; the lowest level (weight 0) has none.
  assert models.supervised_levels(model.config) == (0, 1)
  assert sorted(k for k in deep["params"] if models.is_aux_head(k)) == ["aux_head1"]
  outputs, _ = model.apply(deep, X, train=True, deep_supervision=True, mutable=["batch_stats"])
  assert [o.shape for o in outputs] == [(2, 16, 16, 3), (2, 8, 8, 3)]
  assert all(o.dtype == jnp.float32 for o in outputs)
  # The default call is the inference network, which runs without the heads.
  stripped = models.without_aux_heads(deep)
  logits = model.apply(deep, X)
  assert isinstance(logits, jax.Array) and logits.shape == (2, 16, 16, 3)
  np.testing.assert_array_equal(logits, model.apply(stripped, X))
  assert models.count_params(stripped) == _count_without_heads(model)
  assert models.count_params(deep) > models.count_params(stripped)


def test_heads_leave_the_other_parameters_as_they_were():
  model = models.build(CONFIGS["unet"])
  plain, deep = _init(model, False), _init(model, True)
  assert not any(models.is_aux_head(k) for k in plain["params"])
  jax.tree.map(np.testing.assert_array_equal, models.without_aux_heads(deep), plain)


def test_deeper_models_supervise_every_level_but_the_lowest():
  model = models.build({"name": "unet", "num_classes": 2, "depth": 4, "features": (2, 2, 4, 4, 4)})
  variables = _init(model, True)
  outputs = model.apply(variables, X, deep_supervision=True)
  assert [o.shape[1:3] for o in outputs] == [(16, 16), (8, 8), (4, 4)]
  assert sorted(k for k in variables["params"] if models.is_aux_head(k)) == [
    "aux_head1",
    "aux_head2",
  ]


def test_level_weights_are_nnunets():
  np.testing.assert_allclose(losses.deep_supervision_weights(4), [4 / 7, 2 / 7, 1 / 7, 0])
  np.testing.assert_allclose(losses.deep_supervision_weights(3), [2 / 3, 1 / 3, 0])
  np.testing.assert_allclose(losses.deep_supervision_weights(2), [1, 0])
  np.testing.assert_allclose(losses.deep_supervision_weights(1), [1])
  # The models give an output exactly to the levels of non-zero weight.
  for depth in (1, 2, 3, 4):
    weights = losses.deep_supervision_weights(depth)
    config = models.config_from({"name": "unet", "depth": depth, "features": (2,) * (depth + 1)})
    assert list(models.supervised_levels(config)) == list(np.flatnonzero(weights))


def test_label_subsampling_keeps_ignore_and_invents_no_class():
  rng = np.random.default_rng(1)
  labels = rng.choice(np.array([0, 2, 255], np.int32), size=(2, 16, 16))
  labels[:, :8, :8] = 255  # an unlabelled corner stays unlabelled
  for factor in (2, 4, 8):
    small = np.asarray(losses.downsample_labels(jnp.asarray(labels), factor))
    assert small.shape == (2, 16 // factor, 16 // factor) and small.dtype == labels.dtype
    assert set(np.unique(small)) <= {0, 2, 255}
    assert (small[:, : 8 // factor, : 8 // factor] == 255).all()
    # Each coarse pixel is the fine pixel nearest its block's centre.
    np.testing.assert_array_equal(small, labels[:, factor // 2 :: factor, factor // 2 :: factor])
  assert losses.downsample_labels(labels, 1) is labels


def test_loss_is_the_weighted_sum_of_the_levels():
  rng = np.random.default_rng(2)
  labels = jnp.asarray(rng.choice(np.array([0, 1, 2, 255]), size=(2, 16, 16)), jnp.int32)
  shapes = [(2, 16, 16, 3), (2, 8, 8, 3)]
  outputs = [jnp.asarray(rng.normal(size=shape), jnp.float32) for shape in shapes]
  weights = losses.deep_supervision_weights(3)
  class_weights = np.array([1.0, 2.0, 0.5], np.float32)
  total, metrics = losses.deep_supervision_loss(outputs, labels, weights, class_weights, 0.5)
  level = [
    losses.segmentation_loss(o, losses.downsample_labels(labels, 2**i), class_weights, 0.5)
    for i, o in enumerate(outputs)
  ]
  np.testing.assert_allclose(total, 2 / 3 * level[0][0] + 1 / 3 * level[1][0], rtol=1e-6)
  np.testing.assert_allclose(metrics["ce"], level[0][1]["ce"])
  np.testing.assert_allclose(metrics["loss_level1"], level[1][0])
  with pytest.raises(ValueError, match="outputs for level weights"):
    losses.deep_supervision_loss(outputs[:1], labels, weights)  # level 1 weighs 1/3


def test_a_deep_supervised_semi_supervised_step_trains_the_heads():
  # The supervised-only step runs in `deep_run` below; this one adds the unlabelled views.
  semi = True
  config = config_lib.base_config()
  config.train.steps, config.train.warmup_steps = 10, 0
  model = models.build(CONFIGS["unet"])
  tx, schedule = state_lib.make_optimizer(config_lib.parse(config).train)
  state = state_lib.create_state(
    model, tx, jax.random.PRNGKey(0), X, teacher=semi, deep_supervision=True
  )
  rng = np.random.default_rng(3)
  batch = {"image": X, "labels": jnp.asarray(rng.integers(0, 3, (2, 16, 16)), jnp.int32)}
  semi_config = None
  if semi:
    batch.update(weak=X, strong=X)
    semi_config = state_lib.Semi(weight=1.0, threshold=0.0, ema=0.5)
  step = jax.jit(
    state_lib.make_train_step(model, tx, schedule, None, 1.0, semi_config, deep_supervision=True)
  )
  before = state.params["aux_head1"]["kernel"]
  new, metrics = step(state, batch)
  assert np.isfinite(metrics["loss"]) and np.isfinite(metrics["loss_level1"])
  assert not np.allclose(new.params["aux_head1"]["kernel"], before)  # the head learns
  assert ("unsup" in metrics) == semi
  # The loss is 2/3 of the full-resolution loss plus 1/3 of level 1's.
  expected = 2 / 3 * (metrics["ce"] + metrics["dice"]) + 1 / 3 * metrics["loss_level1"]
  if semi:
    expected = expected + metrics["unsup"]
  np.testing.assert_allclose(metrics["loss"], expected, rtol=1e-5)
  # The validation step reads the full-resolution logits only.
  eval_step = jax.jit(state_lib.make_eval_step(model, 3, None, 1.0))
  _, loss_sum, count = eval_step(new, batch)
  plain = eval_step(new.replace(params=models.without_aux_heads(new.params)), batch)
  np.testing.assert_allclose(loss_sum, plain[1])
  assert int(count) == 2 * 16 * 16


@pytest.fixture(scope="module")
def deep_run(tmp_path_factory):
  """A tiny depth-3 U-Net trained with deep supervision, as `fibseg train` trains it."""
  root = tmp_path_factory.mktemp("deep")
  path = make_volume(str(root / "vol.zarr"))
  workdir = str(root / "run")
  config = _config(path, deep_supervision=True)
  loop.train_and_evaluate(config, workdir, progress=False)
  return path, workdir


def _config(path, **train):
  config = tiny_config(path, steps=2, **train)
  config.model.depth, config.model.features = 3, (4, 8, 8, 8)
  return config


def test_a_deep_supervised_checkpoint_segments_like_any_other(deep_run, tmp_path):
  path, workdir = deep_run
  rows = metrics_writer.read_metrics(os.path.join(workdir, "metrics.jsonl"))
  train_rows = [r for r in rows if "loss" in r]
  assert [r["step"] for r in train_rows] == [1, 2]
  assert all(np.isfinite(r["loss"]) and np.isfinite(r["loss_level1"]) for r in train_rows)
  restored = checkpoint.load(workdir)
  assert not any(models.is_aux_head(k) for k in restored.variables["params"])
  assert "aux_head1" in checkpoint.load(workdir, aux_heads=True).variables["params"]
  plain = restored.model.init(jax.random.PRNGKey(0), jnp.zeros((1, 3, 16, 16, 2)))
  assert models.count_params(restored.variables) == models.count_params(plain)
  out = str(tmp_path / "seg.zarr")
  infer.segment_from_checkpoint(
    workdir, path, output=out, settings=infer.SegmentSettings(tile=16, overlap=4)
  )
  labels = infer.open_array(out).read().result()
  assert labels.shape == (6, 48, 48)
  assert set(np.unique(labels)) <= {0, 1, 2}


@pytest.mark.parametrize("deep_supervision", [True, False])
def test_fine_tuning_from_a_deep_supervised_checkpoint(deep_run, deep_supervision):
  path, workdir = deep_run
  settings = loop.prepare(_config(path, deep_supervision=deep_supervision)).settings
  model = models.build(settings.model)
  tx, _ = state_lib.make_optimizer(settings.train)
  sample = jnp.zeros((1, 3, 16, 16, 2))
  fresh = state_lib.create_state(
    model, tx, jax.random.PRNGKey(5), sample, deep_supervision=deep_supervision
  )
  replicated = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  tuned, _ = loop._init_from(fresh, settings, tx, workdir, replicated)
  source = checkpoint.load(workdir, aux_heads=True).variables["params"]
  # The heads come along when this run has them too, and are dropped otherwise.
  assert ("aux_head1" in tuned.params) == deep_supervision
  expected = source if deep_supervision else models.without_aux_heads(source)
  jax.tree.map(np.testing.assert_array_equal, tuned.params, expected)
  # Resuming the deep-supervised workdir without deep supervision is another experiment.
  if not deep_supervision:
    with pytest.raises(loop.ConfigError, match="train.deep_supervision=True there, False now"):
      loop.check_workdir(settings, workdir)
