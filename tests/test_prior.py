"""The domain-randomised generator, the enhancer, `fibseg pretrain` and the shipped prior."""

import os
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tifffile

from fibseg_jax.data import randomised
from fibseg_jax.data import volume as volume_lib
from fibseg_jax.infer import enhance
from fibseg_jax.models import enhancer
from fibseg_jax.train import pretrain

SMALL = (2, 48, 48)


def write_volume(root, stack, labels: dict) -> str:
  """A volume of a random draw: channels and classes named by count, `labels` {z: [y, x]}."""
  channels = ("ICE", "TLD", "SE")[: stack.num_channels]
  classes = tuple(f"phase{k}" for k in range(stack.num_classes))
  with volume_lib.create_volume(
    str(root),
    shape=stack.labels.shape,
    dtype="uint16",
    channels=channels,
    classes=classes,
    voxel_size_nm=(10.0, 10.0, 10.0),
  ) as writer:
    for z in range(stack.labels.shape[0]):
      writer.write_slice(z, stack.image[z], labels.get(z))
    writer.commit()
  return str(root)


def test_draw_is_deterministic_per_seed():
  a, b, c = randomised.draw(3, SMALL), randomised.draw(3, SMALL), randomised.draw(4, SMALL)
  np.testing.assert_array_equal(a.image, b.image)
  np.testing.assert_array_equal(a.labels, b.labels)
  assert a.params == b.params
  assert not np.array_equal(a.labels, c.labels) or not np.array_equal(a.image, c.image)


def test_draws_cover_the_ranges():
  draws = [randomised.draw(seed, SMALL) for seed in range(60)]
  assert {d.num_channels for d in draws} == {1, 2, 3}
  assert {len(d.params["phases"]) for d in draws} >= {2, 3, 4, 5}
  kinds = {p["kind"] for d in draws for p in d.params["phases"][1:]}
  assert kinds == set(randomised.MORPHOLOGIES)
  for name in randomised.ARTIFACT_P:
    values = [d.params["severity"][name] for d in draws]
    assert max(values) > 0, name
    if randomised.ARTIFACT_P[name] < 1:
      assert min(values) == 0, name
  assert any(d.params["pore"] is not None for d in draws)
  for d in draws:
    assert d.image.dtype == np.uint16 and d.image.shape == (*SMALL, d.num_channels)
    # Every phase of the draw is in it, numbered 0..k-1.
    assert sorted(np.unique(d.labels)) == list(range(d.num_classes))
    assert randomised.MIN_PHASES <= d.num_classes <= randomised.MAX_PHASES


def test_draw_asks_are_kept_and_checked():
  d = randomised.draw(0, (1, 64, 64), num_classes=2, num_channels=3)
  assert d.num_channels == 3 and d.num_classes == 2
  with pytest.raises(ValueError, match="num_classes=7"):
    randomised.draw(0, SMALL, num_classes=7)
  with pytest.raises(ValueError, match="shape"):
    randomised.draw(0, (1, 8, 8))


@pytest.mark.parametrize("channels", [1, 2, 3])
@pytest.mark.parametrize("classes", [2, 6])
def test_enhancer_keeps_shapes_for_any_channel_and_class_count(channels, classes):
  model = enhancer.Enhancer(enhancer.EnhancerConfig(depth=2, features=(4, 8, 8), stem=2))
  variables = model.init(jax.random.key(0), jnp.zeros((1, 16, 16, 1)), jnp.zeros((1, 16, 16, 2)))
  rng = np.random.default_rng(0)
  probs = jax.nn.softmax(jnp.asarray(rng.normal(size=(2, 32, 16, classes)), jnp.float32))
  out = model.apply(variables, jnp.ones((2, 32, 16, channels)), probs)
  assert out.shape == (2, 32, 16, classes)
  assert np.isfinite(np.asarray(out)).all()


def test_enhancer_is_equivariant_to_the_order_of_classes():
  model = enhancer.Enhancer(enhancer.EnhancerConfig(depth=2, features=(4, 8, 8), stem=2))
  variables = model.init(jax.random.key(1), jnp.zeros((1, 16, 16, 1)), jnp.zeros((1, 16, 16, 2)))
  rng = np.random.default_rng(1)
  image = jnp.asarray(rng.normal(size=(1, 32, 32, 2)), jnp.float32)
  probs = jax.nn.softmax(jnp.asarray(rng.normal(size=(1, 32, 32, 4)), jnp.float32))
  order = jnp.array([2, 0, 3, 1])
  a = model.apply(variables, image, probs)
  b = model.apply(variables, image, probs[..., order])
  np.testing.assert_allclose(np.asarray(a)[..., order], np.asarray(b), atol=1e-5)


def test_enhancer_refuses_mismatched_shapes():
  model = enhancer.Enhancer(enhancer.EnhancerConfig(depth=2, features=(4, 8, 8), stem=2))
  with pytest.raises(Exception, match="share batch, y and x"):
    model.init(jax.random.key(0), jnp.zeros((1, 16, 16, 1)), jnp.zeros((1, 32, 16, 2)))


# One class and channel count, so the toy run compiles its steps once.
TINY = dict(
  num_classes=2,
  num_channels=1,
  draws=3,
  held_out=1,
  shape=(2, 64, 64),
  steps=4,
  batch_size=2,
  patch=32,
  save_every=2,
  workers=1,
  features=(4, 8, 8),
)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
  """A whole `pretrain.train` run at toy size, and its export."""
  workdir = str(tmp_path_factory.mktemp("pretrain"))
  config = pretrain.PretrainConfig(**TINY)
  result = pretrain.train(config, workdir, progress=False, log=lambda *_: None)
  export = os.path.join(workdir, "export")
  pretrain.export(result["trainer"], export, {"command": "test"})
  return workdir, config, result, export


def test_pool_draws_are_whole_files_with_forest_probabilities(tiny_run):
  workdir, config, _, _ = tiny_run
  names = sorted(os.listdir(os.path.join(workdir, pretrain.POOL)))
  assert len(names) == config.draws + config.held_out
  assert not [n for n in names if "partial" in n]
  e = pretrain.load_example(pretrain.draw_path(workdir, 0))
  k = e.probabilities.shape[-1]
  assert e.image.shape[:3] == e.labels.shape == e.painted.shape == config.shape
  sums = e.probabilities.astype(np.int32).sum(-1)
  assert np.abs(sums - 255).max() <= k  # rounded probabilities sum to 1
  painted = e.painted[e.painted != 255]
  assert painted.size and (painted == e.labels[e.painted != 255]).all()


def test_pretraining_resumes_to_the_same_weights(tiny_run, tmp_path):
  workdir, config, result, _ = tiny_run
  # The same run stopped at step 2 (its checkpoint) and resumed reaches step 4 equal.
  other = str(tmp_path / "resumed")
  shutil.copytree(os.path.join(workdir, pretrain.POOL), os.path.join(other, pretrain.POOL))
  pretrain.train(config, other, progress=False, log=lambda *_: None, stop_at=2)
  assert sorted(os.listdir(os.path.join(other, "checkpoints"))) == ["2"]
  lines = []
  resumed = pretrain.train(config, other, progress=False, log=lines.append)
  assert any("resumed at step 2" in line for line in lines)
  a = jax.tree_util.tree_leaves(result["trainer"].variables())
  b = jax.tree_util.tree_leaves(resumed["trainer"].variables())
  for x, y in zip(a, b, strict=True):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-5, atol=1e-6)


def test_pretraining_refuses_a_workdir_with_other_settings(tiny_run):
  workdir, _, _, _ = tiny_run
  with pytest.raises(ValueError, match="--workdir=.*other settings"):
    pretrain.train(pretrain.PretrainConfig(**{**TINY, "draws": 5}), workdir, progress=False)


def test_export_loads_and_checks_its_checksum(tiny_run, tmp_path):
  _, _, result, export = tiny_run
  prior = enhance.load_prior(export)
  assert prior.provenance["generator_version"] == pretrain.GENERATOR_VERSION
  out = enhance.enhance(prior, np.zeros((40, 24, 2), np.float32), np.full((40, 24, 3), 1 / 3))
  assert out.shape == (40, 24, 3)
  np.testing.assert_allclose(out.sum(-1), 1, atol=1e-5)
  altered = tmp_path / "altered"
  shutil.copytree(export, altered)
  with open(altered / enhance.WEIGHTS, "r+b") as f:
    f.seek(100)
    f.write(b"\x00\x01\x02\x03")
  with pytest.raises(enhance.PriorError, match="sha256"):
    enhance.load_prior(str(altered))
  with pytest.raises(enhance.PriorError, match="no prior"):
    enhance.load_prior(str(tmp_path / "nowhere"))


def test_preview_never_reads_the_excluded_slices_labels(tmp_path):
  prior = enhance.load_prior()
  stack = randomised.draw(5, (3, 64, 64), num_classes=3, num_channels=2)

  def volume(eval_labels):
    root = tmp_path / f"v{len(os.listdir(tmp_path))}.zarr"
    return volume_lib.open_volume(write_volume(root, stack, {0: stack.labels[0], 2: eval_labels}))

  results = [
    enhance.preview(volume(labels), ("ICE", "TLD"), [1, 2], prior=prior, exclude=[2])
    for labels in (stack.labels[2], np.full_like(stack.labels[2], 2))
  ]
  assert results[0].training_slices == (0,)
  for z in (1, 2):
    np.testing.assert_array_equal(results[0].labels[z], results[1].labels[z])
    assert results[0].labels[z].shape == (64, 64)


SHIPPED = os.path.join(enhance.PRIOR_DIR, enhance.WEIGHTS)


def test_the_shipped_prior_matches_its_checksum_and_serves_any_stack():
  prior = enhance.load_prior()  # verifies the sha256 of prior.json
  assert os.path.getsize(SHIPPED) < 20e6
  for key in ("command", "generator_version", "pretrain", "held_out", "data"):
    assert key in prior.provenance, key
  rng = np.random.default_rng(0)
  for channels in (1, 2, 3):
    for classes in (2, 4, 6):
      probs = rng.dirichlet(np.ones(classes), size=(50, 70)).astype(np.float32)
      out = enhance.enhance(prior, rng.normal(size=(50, 70, channels)), probs)
      assert out.shape == (50, 70, classes)


def test_fibseg_preview_writes_each_slice_and_refuses_a_foreign_folder(tmp_path):
  stack = randomised.draw(6, (3, 64, 64), num_classes=2, num_channels=1)
  root = write_volume(tmp_path / "vol.zarr", stack, {0: stack.labels[0], 2: stack.labels[2]})
  out = tmp_path / "preview"
  command = [sys.executable, "-m", "fibseg_jax.cli", "preview", f"--volume={root}"]
  command += ["--slices=1,2", "--exclude=2", f"--out={out}"]
  done = subprocess.run(command, capture_output=True, text=True, timeout=600)
  assert done.returncode == 0, done.stderr
  assert "preview: slices 1, 2" in done.stdout and "on slices 0" in done.stdout
  written = {"preview.json", "slice_0001.png", "slice_0001.tif", "slice_0002.png"}
  assert written | {"slice_0002.tif"} <= set(os.listdir(out))
  assert tifffile.imread(out / "slice_0002.tif").shape == (64, 64)
  foreign = tmp_path / "foreign"
  foreign.mkdir()
  (foreign / "notes.txt").write_text("mine")
  command[-1] = f"--out={foreign}"
  done = subprocess.run(command, capture_output=True, text=True, timeout=600)
  assert done.returncode != 0 and "--out" in done.stderr
  assert (foreign / "notes.txt").read_text() == "mine"


def test_napari_session_previews_from_saved_strokes(tmp_path):
  from fibseg_jax.data import annotations
  from fibseg_jax.napari import session as session_lib

  prior = enhance.load_prior()
  stack = randomised.draw(7, (3, 64, 64), num_classes=3, num_channels=2)
  root = write_volume(tmp_path / "vol.zarr", stack, {})
  session = session_lib.Session(root)
  with pytest.raises(session_lib.SessionError, match="preview from strokes"):
    session.preview_from_strokes(1, prior=prior)
  painted = np.zeros(stack.labels.shape, np.uint8)  # napari: 0 = not painted, class + 1
  strokes = annotations.strokes(stack.labels[0], 0.05, seed=0)
  painted[0] = np.where(strokes == 255, 0, strokes + 1)
  session.save_painted(painted)
  labels, uncertainty = session.preview_from_strokes(1, prior=prior)
  assert labels.shape == uncertainty.shape == (64, 64)
  assert set(np.unique(labels)) <= {1, 2, 3}
  assert 0 <= uncertainty.min() and uncertainty.max() <= 1
