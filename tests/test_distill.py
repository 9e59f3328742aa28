"""Distillation: the soft cross-entropy, the teacher's patches, the step and the loop."""

import os
import shutil
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tensorstore as ts

from fibseg_jax import checkpoint, models
from fibseg_jax.data import loader as loader_lib
from fibseg_jax.data import volume as volume_lib
from fibseg_jax.infer import distill as infer_distill
from fibseg_jax.train import config as config_lib
from fibseg_jax.train import distill, loop, losses, metrics_writer
from fibseg_jax.train import state as state_lib

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from test_semi import _loader as semi_loader  # noqa: E402 - its tiny loader
from test_train import make_volume, tiny_config  # noqa: E402 - its tiny volume and config


def test_soft_cross_entropy_is_the_kl_gradient_and_skips_untaught_pixels():
  rng = np.random.default_rng(0)
  logits = jnp.asarray(rng.normal(size=(2, 4, 4, 3)), jnp.float32)
  targets = jax.nn.softmax(jnp.asarray(rng.normal(size=(2, 4, 4, 3)) * 3, jnp.float32), -1)
  targets = targets.at[1].set(0.0)  # no teacher there
  loss = losses.soft_cross_entropy(logits, targets)
  manual = -np.sum(np.asarray(targets[0]) * np.asarray(jax.nn.log_softmax(logits[0])), -1).mean()
  np.testing.assert_allclose(float(loss), manual, rtol=1e-5)
  grad = jax.grad(losses.soft_cross_entropy)(logits, targets)
  expected = (jax.nn.softmax(logits[0]) - targets[0]) / 16
  np.testing.assert_allclose(grad[0], expected, atol=1e-6)
  assert float(jnp.abs(grad[1]).sum()) == 0
  assert float(losses.soft_cross_entropy(logits, jnp.zeros_like(targets))) == 0


def _teacher_from_ice(volume, path):
  """A probabilities array whose class 0 is the ICE image, so alignment can be checked."""
  raw = volume.image[..., 0].read().result().astype(np.float64)
  p0 = np.rint(raw / 65535 * 255).astype(np.uint8)
  probs = np.stack([p0, 255 - p0, np.zeros_like(p0)], -1)
  spec = {
    "driver": "zarr3",
    "kvstore": volume_lib.kvstore_spec(path),
    "metadata": {"shape": list(probs.shape), "data_type": "uint8"},
    "create": True,
  }
  ts.open(spec).result().write(probs).result()
  return path


def _loader(volume, **overrides):
  return semi_loader(volume, workers=2, eval_slices=(4,), **overrides)


def test_teacher_patches_move_with_the_image_and_leave_the_labelled_stream(tmp_path):
  volume = volume_lib.open_volume(make_volume(str(tmp_path / "v.zarr"), shape=(8, 48, 48)))
  teacher = _teacher_from_ice(volume, str(tmp_path / "t.zarr"))
  taught = _loader(volume, unlabelled_batch=8, teacher=teacher)
  plain = _loader(volume)
  offset, scale = volume.normalization(("ICE",))
  turned = 0
  for step, (a, b) in enumerate(zip(taught.batches(), plain.batches(), strict=False)):
    if step == 6:
      break
    np.testing.assert_array_equal(a["image"], b["image"])  # the labelled part is unchanged
    np.testing.assert_array_equal(a["labels"], b["labels"])
    assert a["teacher"].shape == (8, 16, 16, 3)
    np.testing.assert_allclose(a["teacher"].sum(-1), 1.0, atol=1e-6)
    # The teacher's class 0 is the centre slice's ICE, wherever flips and turns moved it.
    raw = a["weak"][:, 1, :, :, 0] / scale[0] + offset[0]
    np.testing.assert_allclose(a["teacher"][..., 0], np.rint(raw / 65535 * 255) / 255, atol=2e-3)
    plan = taught.unlabelled_plan(step)
    turned += sum(plan.symmetry(i).turns % 4 != 0 for i in range(len(plan)))
  assert turned  # the check saw moved patches
  warped = _loader(volume, unlabelled_batch=8, teacher=teacher, rotation=180.0, spatial_p=1.0)
  views = warped.read_unlabelled(warped.unlabelled_plan(0))
  sums = views["teacher"].sum(-1)
  assert np.all(np.isclose(sums, 0) | np.isclose(sums, 1))  # nearest: one source pixel each
  assert np.isclose(sums, 0).any()  # corners turned out of the volume teach nothing
  for loader in (taught, plain, warped):
    loader.close()


def test_a_teacher_of_another_shape_is_refused_naming_the_flag(tmp_path):
  volume = volume_lib.open_volume(make_volume(str(tmp_path / "v.zarr")))
  other = volume_lib.open_volume(make_volume(str(tmp_path / "o.zarr"), shape=(6, 32, 32)))
  teacher = _teacher_from_ice(other, str(tmp_path / "t.zarr"))
  with pytest.raises(loader_lib.LoaderError, match=r"teacher.*\[6, 32, 32, 3\].*\[6, 48, 48, 3\]"):
    _loader(volume, unlabelled_batch=4, teacher=teacher)


def test_zero_weight_is_the_supervised_step(tmp_path):
  config = tiny_config(str(make_volume(str(tmp_path / "v.zarr"))))
  exp = loop.prepare(config)
  model = models.build(exp.settings.model)
  tx, schedule = state_lib.make_optimizer(exp.settings.train)
  sample = jnp.zeros((1, 3, 16, 16, 2))
  with jax.threefry_partitionable(False):  # as the loop: compiled, not op by op
    state = jax.jit(lambda r: state_lib.create_state(model, tx, r, sample))(jax.random.PRNGKey(0))
  rng = np.random.default_rng(0)
  batch = {
    "image": jnp.asarray(rng.normal(size=(4, 3, 16, 16, 2)), jnp.float32),
    "labels": jnp.asarray(rng.integers(0, 3, (4, 16, 16)), jnp.int32),
    "strong": jnp.asarray(rng.normal(size=(4, 3, 16, 16, 2)), jnp.float32),
    "teacher": jax.nn.softmax(jnp.asarray(rng.normal(size=(4, 16, 16, 3)), jnp.float32)),
  }
  plain = jax.jit(state_lib.make_train_step(model, tx, schedule, None, 1.0))
  off = jax.jit(state_lib.make_train_step(model, tx, schedule, None, 1.0, distill_weight=0.0))
  on = jax.jit(state_lib.make_train_step(model, tx, schedule, None, 1.0, distill_weight=1.0))
  a, b, c = (step(state, batch) for step in (plain, off, on))
  for x, y in zip(jax.tree.leaves(a[0]), jax.tree.leaves(b[0]), strict=True):
    np.testing.assert_array_equal(x, y)
  assert np.isfinite(float(c[1]["distill"])) and float(c[1]["distill"]) > 0
  assert float(c[1]["loss"]) > float(a[1]["loss"])


def _final(workdir):
  return jax.tree.leaves(checkpoint.load(workdir, best=False).variables)


def test_distillation_resumes_exactly_and_never_reads_evaluation_labels(tmp_path):
  path = str(make_volume(str(tmp_path / "v.zarr"), shape=(8, 48, 48)))
  teacher = str(tmp_path / "teacher")
  base = tiny_config(path)
  base.data.eval_slices = "4"
  loop.train_and_evaluate(base, teacher, progress=False)
  config = tiny_config(path)
  config.data.eval_slices = "4"
  config.distill.teacher = teacher
  config.distill.tta = "off"
  whole, broken = str(tmp_path / "whole"), str(tmp_path / "broken")
  with pytest.raises(config_lib.ConfigError, match="not computed yet"):
    loop.train_and_evaluate(config, whole, progress=False)
  assert infer_distill.prepare_teacher(config, whole, progress=False) == os.path.join(
    whole, "teacher", "probabilities.zarr"
  )
  loop.train_and_evaluate(config, whole, progress=False)
  record = os.path.join(whole, "teacher", "teacher.json")
  stamp = os.stat(record).st_mtime_ns
  infer_distill.prepare_teacher(config, whole, progress=False)  # complete: nothing redone
  assert os.stat(record).st_mtime_ns == stamp
  rows = metrics_writer.read_metrics(os.path.join(whole, "metrics.jsonl"))
  assert all(np.isfinite(r["distill"]) for r in rows if "loss" in r)
  # Other labels on the evaluation slice, then a run that "crashes" after step 2 and
  # resumes: the same teacher and the same student as the uninterrupted run.
  labels = volume_lib.open_volume(path).labels
  labels[4].write(np.full(labels.shape[1:], 2, np.uint8)).result()
  infer_distill.prepare_teacher(config, broken, progress=False)
  loop.train_and_evaluate(config, broken, progress=False)
  shutil.rmtree(os.path.join(broken, checkpoint.CHECKPOINT_DIR, "4"))
  loop.train_and_evaluate(config, broken, progress=False)
  for x, y in zip(_final(whole), _final(broken), strict=True):
    np.testing.assert_array_equal(x, y)
  # A resumed student keeps its teacher.
  with pytest.raises(config_lib.ConfigError, match="--config.distill.teacher="):
    loop.train_and_evaluate(tiny_config(path, eval_every=2), whole, progress=False)


def test_distill_mistakes_name_the_flag(tmp_path):
  path = str(make_volume(str(tmp_path / "v.zarr")))
  config = tiny_config(path)
  config.distill.teacher = str(tmp_path / "nowhere")
  with pytest.raises(config_lib.ConfigError, match="neither a training workdir nor"):
    loop.prepare(config, str(tmp_path / "student"))
  config.distill.teacher = str(tmp_path / "student")
  os.makedirs(str(tmp_path / "student"))
  with pytest.raises(config_lib.ConfigError, match="the student's own --workdir"):
    loop.prepare(config, str(tmp_path / "student"))
  config.distill.teacher = str(tmp_path)
  config.semi.weight = 1.0
  with pytest.raises(config_lib.ConfigError, match="alternatives"):
    loop.prepare(config, str(tmp_path / "student"))
  config.semi.weight = 0.0
  config.distill.weight = -1.0
  with pytest.raises(config_lib.ConfigError, match="--config.distill.weight=-1.0"):
    distill.settings(config_lib.parse(config).distill, str(tmp_path / "student"))


def test_a_forest_fitted_on_the_training_pixels_teaches_and_is_computed_once(tmp_path):
  """`distill.teacher=forest`: the forest's probabilities of every slice, from the run's
  own training pixels only (evaluation labels unseen), written once, then trained on."""
  path = str(make_volume(str(tmp_path / "v.zarr"), shape=(6, 48, 48)))
  config = tiny_config(path)
  config.data.eval_slices = "4"
  config.distill.teacher = "forest"
  student = str(tmp_path / "student")
  with pytest.raises(config_lib.ConfigError, match="not computed yet"):
    loop.train_and_evaluate(config, student, progress=False)
  array = infer_distill.prepare_teacher(config, student, progress=False)
  assert array == os.path.join(student, "teacher", "probabilities.zarr")
  probs = ts.open({"driver": "zarr3", "kvstore": {"driver": "file", "path": array}}).result()
  p = probs.read().result()
  assert p.shape == (6, 48, 48, 3) and p.dtype == np.uint8
  assert np.abs(p.astype(int).sum(-1) - 255).max() <= 2  # rounded probabilities
  # The forest learned the bands: its argmax matches the truth on most of a training slice.
  truth = volume_lib.open_volume(path).read_labels(1)
  assert (p[1].argmax(-1) == truth).mean() > 0.8
  stamp = os.stat(array).st_mtime_ns
  assert infer_distill.prepare_teacher(config, student, progress=False) == array
  assert os.stat(array).st_mtime_ns == stamp  # complete: not redone
  loop.train_and_evaluate(config, student, progress=False)
  rows = metrics_writer.read_metrics(os.path.join(student, "metrics.jsonl"))
  assert all(np.isfinite(r["distill"]) for r in rows if "loss" in r)
  # Other labels on the evaluation slice: the same teacher (they are never read).
  labels = volume_lib.open_volume(path).labels
  labels[4].write(np.full(labels.shape[1:], 2, np.uint8)).result()
  other = infer_distill.prepare_teacher(config, str(tmp_path / "other"), progress=False)
  again = ts.open({"driver": "zarr3", "kvstore": {"driver": "file", "path": other}}).result()
  np.testing.assert_array_equal(again.read().result(), p)
  # Another seed is another forest: not in the same workdir.
  config.train.seed = 1
  with pytest.raises(config_lib.ConfigError, match="use a new --workdir"):
    infer_distill.prepare_teacher(config, student, progress=False)
  config.distill.teacher = f"forest,{student}"
  with pytest.raises(config_lib.ConfigError, match="a teacher on its own"):
    distill.settings(config_lib.parse(config).distill, str(tmp_path / "third"))
