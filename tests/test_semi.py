"""Semi-supervised training: the consistency loss, the unlabelled stream and the step."""

import dataclasses
import os
import shutil
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import serialization

from fibseg_jax import checkpoint, models
from fibseg_jax.data import loader as loader_lib
from fibseg_jax.data import volume as volume_lib
from fibseg_jax.train import config as config_lib
from fibseg_jax.train import loop, losses, metrics_writer
from fibseg_jax.train import state as state_lib

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from test_train import make_volume, tiny_config  # noqa: E402 - its tiny volume and config


def test_consistency_is_finite_and_only_the_student_learns():
  rng = np.random.default_rng(0)
  student = jnp.asarray(rng.normal(size=(2, 8, 8, 3)), jnp.float32)
  teacher = jnp.asarray(rng.normal(size=(2, 8, 8, 3)) * 5, jnp.float32)
  for mode in ("pseudo", "soft"):
    loss, teaching = losses.consistency(student, teacher, mode, 0.6)
    assert np.isfinite(float(loss)) and float(loss) > 0
    assert 0 < float(teaching) <= 1
    grads = jax.grad(lambda s, t, m=mode: losses.consistency(s, t, m, 0.6)[0], (0, 1))(
      student, teacher
    )
    assert float(jnp.abs(grads[0]).sum()) > 0
    assert float(jnp.abs(grads[1]).sum()) == 0  # the teacher is not trained by it


def test_unconfident_teacher_teaches_nothing_and_agreement_costs_nothing():
  student = jnp.asarray(np.random.default_rng(1).normal(size=(1, 4, 4, 3)), jnp.float32)
  uniform = jnp.zeros((1, 4, 4, 3))
  loss, teaching = losses.consistency(student, uniform, "pseudo", 0.9)
  assert float(loss) == 0 and float(teaching) == 0
  loss, _ = losses.consistency(student, student, "soft")
  assert float(loss) == 0
  with pytest.raises(ValueError, match="mode"):
    losses.consistency(student, student, "hard")


def test_student_view_maps_back_onto_the_teachers_pixels():
  """A per-pixel model's logits of the moved view, moved back, are those of the unmoved one."""
  x = jnp.asarray(np.random.default_rng(2).normal(size=(2, 3, 8, 8, 2)), jnp.float32)

  def per_pixel(v):  # [b, s, y, x, c] -> [b, y, x, 3], symmetric in the slab order
    centre, around = v[:, 1], v[:, 0] + v[:, 2]
    return jnp.concatenate([centre, around[..., :1]], -1)

  seen = set()
  for seed in range(24):
    moved, back = state_lib.semi_views(jax.random.PRNGKey(seed), x)
    seen.add(tuple(np.asarray(moved[0, 1, 0, :2, 0]).round(5)))
    np.testing.assert_allclose(back(per_pixel(moved)), per_pixel(x), rtol=1e-6)
  assert len(seen) > 3  # it does move the view


def _loader(volume, **overrides):
  """A tiny synchronous slab loader of the test volume; `overrides` are LoaderConfig fields."""
  fields = dict(
    channels=("ICE", "TLD"), slices=3, patch=16, batch_size=4, val_block=16, prefetch=0, workers=1
  )
  return loader_lib.SlabLoader(volume, loader_lib.LoaderConfig(**{**fields, **overrides}))


class _Recording:
  """A labels tensorstore that records the slices read through it."""

  def __init__(self, store, seen):
    self._store, self._seen = store, seen

  def __getitem__(self, index):
    z = index[0] if isinstance(index, tuple) else index
    self._seen.update(range(z.start or 0, z.stop)) if isinstance(z, slice) else self._seen.add(z)
    return self._store[index]


def test_unlabelled_stream_reads_images_only_and_keeps_the_labelled_stream(tmp_path):
  volume = volume_lib.open_volume(make_volume(str(tmp_path / "v.zarr"), shape=(8, 48, 48)))
  seen = set()
  recorded = dataclasses.replace(volume, labels=_Recording(volume.labels, seen))
  semi = _loader(recorded, eval_slices=(4,), unlabelled_batch=8)
  plain = _loader(volume, eval_slices=(4,))
  zs = set()
  for step, (a, b) in enumerate(zip(semi.batches(), plain.batches(), strict=False)):
    if step == 12:
      break
    np.testing.assert_array_equal(a["image"], b["image"])  # labelled part unchanged
    np.testing.assert_array_equal(a["labels"], b["labels"])
    assert a["weak"].shape == a["strong"].shape == (8, 3, 16, 16, 2)
    assert not np.array_equal(a["weak"], a["strong"])  # the strong view is jittered
    zs.update(semi.unlabelled_plan(step).z.tolist())
  assert 4 not in seen, "an evaluation slice's labels were read"
  assert zs - set(volume.metadata.annotated_slices)  # unannotated slices are drawn
  again = _loader(volume, eval_slices=(4,), unlabelled_batch=8)
  first = next(again.batches(start_step=5))
  direct = semi.read_unlabelled(semi.unlabelled_plan(5))
  np.testing.assert_array_equal(first["strong"], direct["strong"])
  for loader in (semi, plain, again):
    loader.close()


def test_weak_and_strong_views_share_the_geometry(tmp_path):
  volume = volume_lib.open_volume(make_volume(str(tmp_path / "v.zarr")))
  loader = _loader(volume, unlabelled_batch=4, gain=0.0, offset=0.0, gamma=0.0)
  views = loader.read_unlabelled(loader.unlabelled_plan(0))
  np.testing.assert_array_equal(views["weak"], views["strong"])


def _step_inputs(tmp_path, weight):
  config = tiny_config(str(make_volume(str(tmp_path / "v.zarr"))))
  config.semi.weight = weight
  exp = loop.prepare(config)
  model = models.build(exp.settings.model)
  tx, schedule = state_lib.make_optimizer(exp.settings.train)
  sample = jnp.zeros((1, 3, 16, 16, 2))
  state = state_lib.create_state(model, tx, jax.random.PRNGKey(0), sample, teacher=weight > 0)
  rng = np.random.default_rng(0)
  batch = {
    "image": jnp.asarray(rng.normal(size=(4, 3, 16, 16, 2)), jnp.float32),
    "labels": jnp.asarray(rng.integers(0, 3, (4, 16, 16)), jnp.int32),
    "weak": jnp.asarray(rng.normal(size=(4, 3, 16, 16, 2)), jnp.float32),
    "strong": jnp.asarray(rng.normal(size=(4, 3, 16, 16, 2)), jnp.float32),
  }
  return model, tx, schedule, state, batch


def test_zero_weight_is_the_supervised_step(tmp_path):
  model, tx, schedule, state, batch = _step_inputs(tmp_path, 0.0)
  supervised = state_lib.make_train_step(model, tx, schedule, None, 1.0)
  off = state_lib.make_train_step(model, tx, schedule, None, 1.0, state_lib.Semi(weight=0.0))
  a, ma = jax.jit(supervised)(state, {"image": batch["image"], "labels": batch["labels"]})
  b, mb = jax.jit(off)(state, batch)
  assert "unsup" not in mb and a.teacher == {} == b.teacher
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    np.testing.assert_array_equal(x, y)


def test_semi_step_is_finite_and_the_teacher_follows(tmp_path):
  model, tx, schedule, state, batch = _step_inputs(tmp_path, 1.0)
  semi = state_lib.Semi(weight=1.0, mode="pseudo", threshold=0.0, ema=0.5)
  step = jax.jit(state_lib.make_train_step(model, tx, schedule, None, 1.0, semi))
  new, metrics = step(state, batch)
  assert all(np.isfinite(float(v)) for v in metrics.values())
  assert float(metrics["unsup"]) > 0 and float(metrics["teaching"]) == 1.0
  leaf = lambda s: jax.tree.leaves(s)[0]  # noqa: E731
  old_t, new_t = leaf(state.teacher["params"]), leaf(new.teacher["params"])
  new_s = leaf(new.params)
  np.testing.assert_allclose(new_t, 0.5 * old_t + 0.5 * new_s, rtol=1e-6, atol=1e-7)


def test_semi_training_resumes_exactly_and_refuses_a_supervised_workdir(tmp_path):
  path = str(make_volume(str(tmp_path / "v.zarr"), shape=(8, 48, 48)))
  config = tiny_config(path)
  config.semi.weight = 1.0
  config.semi.rampup = 0.5
  whole, broken = str(tmp_path / "whole"), str(tmp_path / "broken")
  loop.train_and_evaluate(config, whole, progress=False)
  loop.train_and_evaluate(config, broken, progress=False)
  shutil.rmtree(os.path.join(broken, checkpoint.CHECKPOINT_DIR, "4"))  # "crash" after step 2
  loop.train_and_evaluate(config, broken, progress=False)
  a, b = (checkpoint.load(w, best=False).variables for w in (whole, broken))
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    np.testing.assert_array_equal(x, y)
  rows = metrics_writer.read_metrics(os.path.join(whole, "metrics.jsonl"))
  assert any("unsup" in r and np.isfinite(r["unsup"]) for r in rows)
  supervised = tiny_config(path)
  with pytest.raises(config_lib.ConfigError, match=r"--config.semi.weight=1.0 there, 0.0 now"):
    loop.train_and_evaluate(supervised, whole, progress=False)


@pytest.mark.parametrize(
  "field, value, message",
  [
    ("mode", "hard", "--config.semi.mode=hard"),
    ("threshold", 1.5, "--config.semi.threshold=1.5"),
    ("ema", 1.0, "--config.semi.ema=1.0"),
    ("batch_size", 0, "--config.semi.batch_size=0"),
    ("weight", float("inf"), "--config.semi.weight=inf: expected a finite number"),
  ],
)
def test_semi_mistakes_name_the_flag(tmp_path, field, value, message):
  config = tiny_config(str(make_volume(str(tmp_path / "v.zarr"))))
  config.semi.weight = 1.0
  config.semi[field] = value
  with pytest.raises(config_lib.ConfigError, match=message):
    loop.prepare(config)


def test_checkpoints_from_before_the_teacher_still_resume(tmp_path):
  """A state saved without a `teacher` field restores into a supervised TrainState."""
  model, tx, _, state, _ = _step_inputs(tmp_path, 0.0)
  old = {k: v for k, v in serialization.to_state_dict(state).items() if k != "teacher"}
  config = tiny_config(str(tmp_path / "v.zarr"))
  mngr = checkpoint.manager(str(tmp_path / "ckpt"))
  checkpoint.save(mngr, 2, old, config, {"step": 2})
  abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), state)
  restored, _, loader_state = checkpoint.restore(mngr, 2, abstract)
  assert isinstance(restored, state_lib.TrainState) and restored.teacher == {}
  assert loader_state == {"step": 2}
  for x, y in zip(jax.tree.leaves(restored), jax.tree.leaves(state), strict=True):
    np.testing.assert_array_equal(x, y)


def test_semi_fine_tuning_starts_its_teacher_from_the_weights(tmp_path):
  path = str(make_volume(str(tmp_path / "v.zarr"), shape=(8, 48, 48)))
  source = str(tmp_path / "source")
  loop.train_and_evaluate(tiny_config(path, steps=2), source, progress=False)
  config = tiny_config(path, steps=2, init_from=source)
  config.semi.weight = 1.0
  loop.train_and_evaluate(config, str(tmp_path / "tuned"), progress=False)
  rows = metrics_writer.read_metrics(str(tmp_path / "tuned" / "metrics.jsonl"))
  assert all(np.isfinite(r["loss"]) for r in rows if "loss" in r)
