"""Tests of fibseg_jax.train.losses: cross-entropy, soft Dice, confusion matrix, IoU."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fibseg_jax.train import losses

IGNORE = losses.IGNORE_LABEL
K = 4


def _batch(seed=0, shape=(2, 5, 6), ignore_share=0.3):
  """Random logits [b, y, x, K] and labels [b, y, x] with some pixels ignored."""
  rng = np.random.default_rng(seed)
  logits = rng.normal(size=(*shape, K)).astype(np.float32) * 2
  labels = rng.integers(0, K, shape).astype(np.int32)
  labels[rng.random(shape) < ignore_share] = IGNORE
  return jnp.asarray(logits), jnp.asarray(labels)


def test_cross_entropy_matches_optax_on_labelled_pixels():
  logits, labels = _batch()
  valid = np.asarray(labels) != IGNORE
  expected = optax.softmax_cross_entropy_with_integer_labels(
    np.asarray(logits)[valid], np.asarray(labels)[valid]
  ).mean()
  np.testing.assert_allclose(losses.cross_entropy(logits, labels), expected, rtol=1e-6)


def test_class_weights_weight_each_pixel_and_normalise_by_weight_sum():
  logits, labels = _batch(1)
  lab = np.asarray(labels)
  valid = lab != IGNORE
  nll = np.asarray(
    optax.softmax_cross_entropy_with_integer_labels(logits, jnp.where(labels == IGNORE, 0, labels))
  )
  weights = np.array([0.5, 2.0, 1.0, 3.0], np.float32)
  w = np.where(valid, weights[np.where(valid, lab, 0)], 0)
  np.testing.assert_allclose(
    losses.cross_entropy(logits, labels, weights), (w * nll).sum() / w.sum(), rtol=1e-5
  )
  # Only class 0 weighs: the mean over class-0 pixels.
  only0 = losses.cross_entropy(logits, labels, np.array([1.0, 0, 0, 0]))
  np.testing.assert_allclose(only0, nll[lab == 0].mean(), rtol=1e-5)
  # A uniform scale changes nothing: weights set the balance, not the size.
  np.testing.assert_allclose(
    losses.cross_entropy(logits, labels, np.full(K, 7.0)),
    losses.cross_entropy(logits, labels),
    rtol=1e-6,
  )


def test_ignored_pixels_change_neither_loss_nor_gradient():
  logits, labels = _batch(2)
  ignored = np.asarray(labels) == IGNORE
  noise = np.random.default_rng(3).normal(size=logits.shape).astype(np.float32) * 10
  other = jnp.where(ignored[..., None], logits + noise, logits)
  weights = jnp.array([1.0, 2.0, 0.5, 1.0])

  @jax.jit
  def loss(lg):
    return losses.segmentation_loss(lg, labels, weights)[0]

  np.testing.assert_allclose(loss(logits), loss(other), rtol=1e-6)
  grad_fn = jax.jit(jax.grad(loss))
  grad = grad_fn(logits)
  np.testing.assert_array_equal(np.asarray(grad)[ignored], 0.0)
  np.testing.assert_allclose(grad, grad_fn(other), atol=1e-7)
  assert np.abs(np.asarray(grad)[~ignored]).sum() > 0


def test_batch_without_labels_gives_zero_loss_and_finite_gradients():
  logits, _ = _batch(4)
  labels = jnp.full(logits.shape[:-1], IGNORE, jnp.int32)
  for fn in (losses.cross_entropy, losses.soft_dice):
    value, grad = jax.jit(jax.value_and_grad(lambda lg, fn=fn: fn(lg, labels)))(logits)
    assert value == 0.0
    assert np.isfinite(np.asarray(grad)).all() and not np.asarray(grad).any()
  (value, aux), grad = jax.jit(
    jax.value_and_grad(lambda lg: losses.segmentation_loss(lg, labels, jnp.ones(K)), has_aux=True)
  )(logits)
  assert value == 0.0 and aux["ce"] == 0.0 and aux["dice"] == 0.0
  assert np.isfinite(np.asarray(grad)).all()


def test_soft_dice_perfect_wrong_and_by_hand():
  _, labels = _batch(5)
  safe = jnp.where(labels == IGNORE, 0, labels)
  perfect = 30.0 * jax.nn.one_hot(safe, K)
  assert losses.soft_dice(perfect, labels) < 1e-5
  wrong = 30.0 * jax.nn.one_hot((safe + 1) % K, K)
  assert losses.soft_dice(wrong, labels) > 0.99

  # Class 3 absent from the labels: left out of the mean.
  logits, labels = _batch(6)
  labels = jnp.where(labels == 3, IGNORE, labels)
  lab = np.asarray(labels)
  valid = lab != IGNORE
  p = np.asarray(jax.nn.softmax(logits))[valid]
  t = np.eye(K)[lab[valid]]
  dice = (2 * (p * t).sum(0) + 1e-6) / (p.sum(0) + t.sum(0) + 1e-6)
  np.testing.assert_allclose(losses.soft_dice(logits, labels), 1 - dice[:3].mean(), rtol=1e-5)


def test_segmentation_loss_sums_terms_and_jits():
  logits, labels = _batch(7)
  weights = jnp.array([1.0, 0.5, 2.0, 1.0])
  loss, aux = losses.segmentation_loss(logits, labels, weights, dice_weight=0.5)
  np.testing.assert_allclose(loss, aux["ce"] + 0.5 * aux["dice"], rtol=1e-6)
  np.testing.assert_allclose(aux["ce"], losses.cross_entropy(logits, labels, weights))
  jitted = jax.jit(losses.segmentation_loss, static_argnames="dice_weight")
  loss_jit, aux_jit = jitted(logits, labels.astype(jnp.uint8), weights, dice_weight=0.5)
  np.testing.assert_allclose(loss_jit, loss, rtol=1e-6)
  chex.assert_trees_all_close(aux_jit, aux, rtol=1e-6)


def test_bfloat16_logits_give_float32_loss():
  logits, labels = _batch(8)
  loss, _ = losses.segmentation_loss(logits.astype(jnp.bfloat16), labels)
  assert loss.dtype == jnp.float32
  np.testing.assert_allclose(loss, losses.segmentation_loss(logits, labels)[0], rtol=2e-2)


def test_confusion_matrix_counts_like_numpy_under_jit():
  logits, labels = _batch(9, shape=(3, 7, 5))
  cm = jax.jit(losses.confusion_matrix)(logits, labels)
  assert cm.dtype == jnp.int32 and cm.shape == (K, K)
  lab, pred = np.asarray(labels), np.asarray(logits).argmax(-1)
  expected = np.zeros((K, K), np.int64)
  valid = lab != IGNORE
  np.add.at(expected, (lab[valid], pred[valid]), 1)
  np.testing.assert_array_equal(cm, expected)
  assert cm.sum() == valid.sum() < lab.size
  np.testing.assert_array_equal(losses.confusion_matrix(logits, labels, num_classes=K), expected)


def test_iou_from_confusion():
  cm = np.array([[3, 1, 0], [2, 4, 0], [0, 0, 0]])
  iou, mean = losses.iou_from_confusion(cm)
  np.testing.assert_allclose(iou[:2], [3 / 6, 4 / 7])
  assert np.isnan(iou[2])
  assert mean == pytest.approx((3 / 6 + 4 / 7) / 2)
  # Predicted but never true: IoU 0, counted in the mean.
  iou, mean = losses.iou_from_confusion(np.array([[2, 2], [0, 0]]))
  np.testing.assert_allclose(iou, [0.5, 0.0])
  assert mean == pytest.approx(0.25)
  iou, mean = losses.iou_from_confusion(np.zeros((2, 2)))
  assert np.isnan(iou).all() and np.isnan(mean)
  with pytest.raises(ValueError, match="square"):
    losses.iou_from_confusion(np.zeros((2, 3)))
