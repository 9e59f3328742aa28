"""The optimizer and learning-rate schedule options: AdamW + cosine, nnU-Net's SGD + poly."""

import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fibseg_jax.train import config as config_lib
from fibseg_jax.train import state as state_lib


def _config(**train):
  config = config_lib.base_config()
  config.train.update({"steps": 100, "warmup_steps": 10, "grad_clip": 0.0, **train})
  return config


def _train(**train) -> config_lib.TrainSettings:
  return config_lib.parse(_config(**train)).train


def test_defaults_are_adamw_with_cosine_and_no_deep_supervision():
  train = config_lib.base_config().train
  assert (train.optimizer, train.schedule, train.deep_supervision) == ("adamw", "cosine", False)
  help_ = config_lib.field_help(config_lib.base_config())
  for name in ("optimizer", "schedule", "deep_supervision"):
    assert help_[f"train.{name}"]
  assert "learning_rate=0.01" in help_["train.optimizer"]


def test_poly_schedule_follows_nnunets_formula_after_the_warm_up():
  config = _config(optimizer="sgd", schedule="poly", learning_rate=0.01)
  _, schedule = state_lib.make_optimizer(config_lib.parse(config).train)
  peak, warmup, steps = 0.01, 10, 100
  np.testing.assert_allclose(schedule(0), 0.0)
  np.testing.assert_allclose(schedule(5), peak / 2, rtol=1e-6)
  np.testing.assert_allclose(schedule(warmup), peak, rtol=1e-6)
  for step in (11, 55, steps - 1):
    t = (step - warmup) / (steps - warmup)
    np.testing.assert_allclose(schedule(step), peak * (1 - t) ** 0.9, rtol=1e-5)
  assert float(schedule(steps - 1)) > 0  # the last step still learns, as in nnU-Net
  # Without warm-up it is nnU-Net's lr * (1 - step / steps) ** 0.9 exactly.
  _, schedule = state_lib.make_optimizer(_train(schedule="poly", warmup_steps=0))
  for step in (0, 30, 99):
    np.testing.assert_allclose(schedule(step), 1e-3 * (1 - step / 100) ** 0.9, rtol=1e-5)


def test_cosine_schedule_is_unchanged():
  _, schedule = state_lib.make_optimizer(_train())
  np.testing.assert_allclose(schedule(0), 0.0)
  np.testing.assert_allclose(schedule(10), 1e-3, rtol=1e-6)
  np.testing.assert_allclose(schedule(55), 1e-3 * (0.01 + 0.99 * 0.5), rtol=1e-5)
  np.testing.assert_allclose(schedule(100), 1e-5, rtol=1e-5)


def test_constant_schedule_holds_the_peak_after_the_warm_up():
  _, schedule = state_lib.make_optimizer(_train(schedule="constant"))
  np.testing.assert_allclose(schedule(0), 0.0)
  for step in (10, 55, 100):
    np.testing.assert_allclose(schedule(step), 1e-3, rtol=1e-6)


def test_sgd_is_nesterov_momentum_099_with_l2_weight_decay():
  tx, _ = state_lib.make_optimizer(
    _train(optimizer="sgd", schedule="poly", learning_rate=0.01, weight_decay=3e-5, warmup_steps=0)
  )
  params = {"w": jnp.array([1.0, -2.0])}
  grads = {"w": jnp.array([0.5, 0.25])}
  opt_state = tx.init(params)
  updates, opt_state = tx.update(grads, opt_state, params)
  g = grads["w"] + 3e-5 * params["w"]
  # Nesterov's first step: the gradient plus momentum times the new velocity (= gradient).
  np.testing.assert_allclose(updates["w"], -0.01 * (1 + 0.99) * g, rtol=1e-6)
  updates, _ = tx.update(grads, opt_state, params)
  velocity = g + 0.99 * g
  lr = 0.01 * (1 - 1 / 100) ** 0.9  # poly at step 1
  np.testing.assert_allclose(updates["w"], -lr * (g + 0.99 * velocity), rtol=1e-5)


def test_adamw_is_still_the_default_optimizer():
  tx, _ = state_lib.make_optimizer(_train(warmup_steps=0))
  params = {"w": jnp.array([1.0, -2.0])}
  grads = {"w": jnp.array([0.5, 0.25])}
  reference = optax.adamw(1e-3, weight_decay=1e-4)
  ours, _ = tx.update(grads, tx.init(params), params)
  theirs, _ = reference.update(grads, reference.init(params), params)
  np.testing.assert_allclose(ours["w"], theirs["w"], rtol=1e-6)


@pytest.mark.parametrize(
  "field, value, allowed",
  [("optimizer", "adam", "'adamw', 'sgd'"), ("schedule", "linear", "'cosine', 'poly', 'constant'")],
)
def test_unknown_names_are_refused_naming_the_flag(field, value, allowed):
  with pytest.raises(config_lib.ConfigError) as caught:
    state_lib.make_optimizer(_train(**{field: value}))
  assert str(caught.value) == f"--config.train.{field}={value!r}: expected one of {allowed}"


def test_a_config_saved_before_the_options_builds_the_old_optimizer():
  config = _config()
  del config.train["optimizer"], config.train["schedule"]
  _, schedule = state_lib.make_optimizer(config_lib.parse(config).train)
  np.testing.assert_allclose(schedule(100), 1e-5, rtol=1e-5)


def test_a_fine_tune_peaks_at_its_share_of_the_learning_rate():
  # Measured (docs/recipe.md): the full peak ends higher, so it stays the default.
  assert config_lib.base_config().train.init_lr_scale == 1.0
  _, fresh = state_lib.make_optimizer(_train(learning_rate=3e-3))
  _, tuned = state_lib.make_optimizer(_train(learning_rate=3e-3, init_from="runs/a"))
  np.testing.assert_allclose(fresh(10), 3e-3, rtol=1e-6)
  np.testing.assert_allclose(tuned(10), 3e-3, rtol=1e-6)
  _, gentle = state_lib.make_optimizer(
    _train(learning_rate=3e-3, init_from="runs/a", init_lr_scale=0.3)
  )
  np.testing.assert_allclose(gentle(10), 9e-4, rtol=1e-6)
  np.testing.assert_allclose(gentle(5), 4.5e-4, rtol=1e-6)  # still warms up
  _, scratch = state_lib.make_optimizer(_train(learning_rate=3e-3, init_lr_scale=0.3))
  np.testing.assert_allclose(scratch(10), 3e-3, rtol=1e-6)  # only fine-tunes are scaled
  for bad in (0, 1.5, -0.1):
    with pytest.raises(config_lib.ConfigError, match=r"--config.train.init_lr_scale=.*\(0, 1\]"):
      state_lib.make_optimizer(_train(init_from="runs/a", init_lr_scale=bad))
