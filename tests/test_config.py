"""`config.parse`: the experiment config typed once, from a ConfigDict or a saved JSON."""

import dataclasses
import json

import ml_collections
import pytest

from fibseg_jax import configs, models
from fibseg_jax.train import config as config_lib


def _config() -> ml_collections.ConfigDict:
  config = configs.load(configs.path("unet"))
  config.data.channels = "ICE, TLD"
  config.data.eval_slices = "3,7"
  config.distill.teacher = "runs/a,runs/b"
  config.train.batch_size = 4
  return config


def test_parse_types_every_section():
  settings = config_lib.parse(_config(), classes=["pore", "csh", "solid"])
  d = settings.data
  assert (d.channels, d.eval_slices, d.classes) == (
    ("ICE", "TLD"),
    (3, 7),
    ("pore", "csh", "solid"),
  )
  assert (d.slices, d.patch, d.val_fraction) == (3, 192, 0.25)
  assert d.recipe["rot90"] is True  # unset: as data.flips
  assert settings.distill.teacher == ("runs/a", "runs/b")
  assert settings.distill.batch_size == 4  # -1: train.batch_size
  assert settings.unlabelled_batch == 4
  assert settings.semi.rampup_steps == round(0.25 * settings.train.steps)
  assert settings.model_name == "unet"
  assert isinstance(settings.model, models.UNetConfig) and settings.model.num_classes == 3
  # The volume decides the class count; without classes it is not known yet.
  assert config_lib.parse(_config()).model is None
  with pytest.raises(dataclasses.FrozenInstanceError):
    settings.data.channels = ("ICE",)


@pytest.mark.parametrize(
  "section, field, value, message",
  [
    ("data", "channels", "", r"^--config.data.channels: give at least one name, e.g. ICE,TLD$"),
    ("data", "channels", "ICE,ICE", r"^--config.data.channels=ICE,ICE: names repeat$"),
    (
      "data",
      "eval_slices",
      "3,x",
      r"^--config.data.eval_slices=3,x: expected comma-separated integers, e.g. 3,7$",
    ),
    ("data", "patch", "big", r"^--config.data.patch='big': expected int$"),
    ("data", "val_fraction", 0.0, r"^--config.data.val_fraction=0.0 must be in \(0, 1\)$"),
    ("train", "steps", 0, r"^--config.train.steps=0 must be at least 1$"),
    ("train", "optimizer", "adam", r"^--config.train.optimizer='adam': expected one of 'adamw'"),
    ("semi", "mode", "hard", r"^--config.semi.mode=hard: expected 'pseudo' or 'soft'$"),
    ("distill", "weight", -1.0, r"^--config.distill.weight=-1.0: expected a number >= 0$"),
    ("model", "depth", 0, r"^--config.model / --config.data: model.depth=0 must be a positive"),
  ],
)
def test_a_bad_value_names_its_flag_and_what_was_expected(section, field, value, message):
  saved = _config().to_dict()
  saved[section][field] = value
  with pytest.raises(config_lib.ConfigError, match=message):
    config_lib.parse(saved, classes=["pore", "csh"])


def test_a_saved_config_with_lists_and_missing_fields_parses_as_the_configdict():
  config = _config()
  config.model.num_classes = 2
  config.data.classes = ("pore", "csh")
  # As a checkpoint saved it: JSON, tuples as lists, comma strings as lists.
  saved = json.loads(json.dumps(config.to_dict()))
  saved["data"]["channels"] = ["ICE", "TLD"]
  saved["data"]["eval_slices"] = [3, 7]
  saved["distill"]["teacher"] = ["runs/a", "runs/b"]
  assert config_lib.parse(saved) == config_lib.parse(config)
  # Saved before the options existed: their defaults.
  for field in ("optimizer", "schedule", "init_lr_scale", "deep_supervision"):
    del saved["train"][field]
  del saved["distill"]
  train = config_lib.parse(saved).train
  assert (train.optimizer, train.schedule, train.init_lr_scale) == ("adamw", "cosine", 1.0)
  assert config_lib.parse(saved).distill.teacher == ()


def test_the_volumes_classes_fill_the_class_count_or_contradict_it():
  config = _config()
  assert config_lib.parse(config, classes=["a", "b"]).model.num_classes == 2
  config.model.num_classes = 3
  config.data.path = "vol.zarr"
  with pytest.raises(
    config_lib.ConfigError,
    match=r"^--config.model.num_classes=3 but volume vol.zarr has 2 classes \['a', 'b'\]; use -1",
  ):
    config_lib.parse(config, classes=["a", "b"])
