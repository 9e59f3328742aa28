"""`--config.train.init_from=prior`: a U-Net run that starts from the shipped prior."""

import os
import shutil

import flax
import jax
import ml_collections
import numpy as np
import pytest
from test_train import make_volume

from fibseg_jax import checkpoint, models
from fibseg_jax.train import config as config_lib
from fibseg_jax.train import from_prior, loop, metrics_writer

PRIOR_FEATURES = (8, 16, 32, 64)


@pytest.fixture(scope="module")
def prior():
  model, variables, provenance = from_prior.read_prior()
  return model, variables, provenance


def _config(**model) -> ml_collections.ConfigDict:
  config = config_lib.base_config()
  config.model.update(models.default_config("unet"))
  config.model.update(model)
  config.train.init_from = "prior"
  return config


def _flat(tree):
  return flax.traverse_util.flatten_dict(flax.core.unfreeze(tree))


# Every pair of (channels, slices), (channels, classes) and (slices, classes) once: an
# orthogonal array over 1-3 channels, slab depth 1/3/5 and 2/4/6 classes.
STACKS = [
  (c, s, (2, 4, 6)[(i + j) % 3]) for i, c in enumerate((1, 2, 3)) for j, s in enumerate((1, 3, 5))
]


@pytest.mark.parametrize(("channels", "slices", "classes"), STACKS)
def test_the_prior_initialises_a_unet_for_any_stack(prior, monkeypatch, channels, slices, classes):
  monkeypatch.setattr(from_prior, "FIT_DRAWS", 3)
  _, variables, provenance = prior
  config = from_prior.adopt_backbone(_config(num_classes=classes))
  assert tuple(config.model.features) == PRIOR_FEATURES == tuple(provenance["model"]["features"])
  assert config.model.depth == 3 and config.model.norm == "batch"
  unet = models.build(config.model)
  shapes = jax.eval_shape(
    unet.init, jax.random.key(0), np.zeros((1, slices, 16, 16, channels), np.float32)
  )
  fresh = jax.tree.map(lambda s: np.full(s.shape, 7.0, s.dtype), shapes)
  kernel, bias, r2 = from_prior.fit_first_conv(prior[0], variables, channels, slices, classes)
  assert kernel.shape == (3, 3, slices * channels, 8) and bias.shape == (8,)
  assert r2 > 0.2  # the first conv reproduces a good part of the prior's first stage
  params, stats, origin = from_prior.map_variables(
    variables, fresh["params"], fresh["batch_stats"], (kernel, bias)
  )
  theirs, mine = _flat(variables["params"]), _flat(params)
  assert jax.tree.map(np.shape, params) == jax.tree.map(np.shape, fresh["params"])
  # The backbone is the prior's, array for array; the first conv fitted; the head fresh.
  copied = [k for k in mine if k[0].startswith(("down", "up")) and k[:2] != ("down0", "conv0")]
  assert len(copied) == len(origin["prior"]) > 30
  for path in copied:
    np.testing.assert_array_equal(mine[path], theirs[path])
  np.testing.assert_array_equal(mine[("down0", "conv0", "kernel")], kernel)
  assert origin["fitted"] == ["down0/conv0/bias", "down0/conv0/kernel"]
  assert origin["fresh"] == ["head/bias", "head/kernel"]
  assert mine[("head", "kernel")].shape == (1, 1, 8, classes)
  assert (mine[("head", "kernel")] == 7.0).all()
  for path, value in _flat(stats).items():
    np.testing.assert_array_equal(value, _flat(variables["batch_stats"])[path])
  logits = unet.apply(
    {"params": params, "batch_stats": stats}, np.ones((1, slices, 16, 16, channels), np.float32)
  )
  assert logits.shape == (1, 16, 16, classes) and np.isfinite(logits).all()


def test_a_conflicting_width_is_a_one_line_config_error():
  with pytest.raises(
    config_lib.ConfigError,
    match=r"--config.model.features=\(4, 8, 16, 32\).*expected \(8, 16, 32, 64\)",
  ) as caught:
    loop.prepare(_config(features=(4, 8, 16, 32)))
  assert "\n" not in str(caught.value)
  with pytest.raises(config_lib.ConfigError, match=r"--config.model.depth=2:.*expected 3"):
    loop.prepare(_config(depth=2, features=PRIOR_FEATURES))
  with pytest.raises(config_lib.ConfigError, match=r"--config.model.name=sensor3d.*U-Net only"):
    config = config_lib.base_config()
    config.model.update(models.default_config("sensor3d"))
    config.train.init_from = "prior"
    loop.prepare(config)
  # The prior's own values, or the U-Net's defaults, are no conflict.
  assert from_prior.adopt_backbone(_config(features=PRIOR_FEATURES)).model.depth == 3


def test_a_pretrain_export_folder_is_a_prior_too(tmp_path):
  export = tmp_path / "export"
  export.mkdir()
  for name in (from_prior.WEIGHTS, from_prior.PROVENANCE):
    shutil.copy(os.path.join(from_prior.PRIOR_DIR, name), export / name)
  assert from_prior.prior_directory("prior") == from_prior.PRIOR_DIR
  assert from_prior.prior_directory(str(export)) == str(export)
  assert from_prior.prior_directory(str(tmp_path)) is None  # a training run's workdir
  config = _config()
  config.train.init_from = str(export)
  assert tuple(from_prior.adopt_backbone(config).model.features) == PRIOR_FEATURES


def test_a_run_from_the_prior_trains_and_keeps_checkpoint_0(prior, tmp_path, capsys, monkeypatch):
  monkeypatch.setattr(from_prior, "FIT_DRAWS", 3)
  path = make_volume(str(tmp_path / "vol.zarr"))
  config = _config(num_classes=-1)
  config.data.path = path
  config.data.patch = 16
  config.data.val_block = 16
  config.data.prefetch = 1
  config.train.update(batch_size=4, steps=2, eval_every=2, log_every=1, warmup_steps=1)
  workdir = str(tmp_path / "run")
  loop.train_and_evaluate(config, workdir, progress=False)
  out = capsys.readouterr().out
  assert "the U-Net takes the prior's backbone (model.depth=3 model.features=(8, 16, 32, 64)" in out
  assert "arrays from the prior (down0, down1, down2, down3, up0, up1, up2" in out
  assert (
    "first conv fitted to 3 slice(s) x 2 channel(s)" in out and "fresh: head (3 classes)" in out
  )
  assert "step 0 (the weights it starts from)" in out
  steps = [r["step"] for r in metrics_writer.read_metrics(os.path.join(workdir, "metrics.jsonl"))]
  assert 0 in steps and 2 in steps
  # A rerun resumes: the saved config holds the prior's widths, as prepare sets them again.
  assert loop.check_workdir(loop.prepare(config).settings, workdir) == 2
  restored = checkpoint.load(workdir, step=0)
  assert restored.step == 0
  assert tuple(restored.config.model.features) == PRIOR_FEATURES
  np.testing.assert_array_equal(
    restored.variables["params"]["down2"]["conv1"]["kernel"],
    prior[1]["params"]["down2"]["conv1"]["kernel"],
  )
  np.testing.assert_array_equal(
    restored.variables["batch_stats"]["up0"]["convs"]["norm1"]["var"],
    prior[1]["batch_stats"]["up0"]["convs"]["norm1"]["var"],
  )
