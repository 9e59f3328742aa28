"""The study's peer rows: skipping without the extra, the nnU-Net dataset, tiny end-to-end runs.

The end-to-end tests need the `peers` extra (torch, monai, nnunetv2) and are skipped
without it; run them with a venv that has it:

  /work/venv_peers/bin/python -m pytest tests/test_peers.py
"""

import dataclasses
import importlib
import json
import math
import os

import numpy as np
import pytest
import tifffile

from fibseg_jax.data import volume as volume_lib
from fibseg_jax.study import budget as budget_lib
from fibseg_jax.study import comparison, peers, runs

# The smoke budget, with the six widths BasicUNet needs.
BUDGET = dataclasses.replace(budget_lib.SMOKE, unet_features=(4, 4, 8, 8, 8, 4), steps=4)


def _available(*modules):
  try:
    for m in modules:
      importlib.import_module(m)
  except ImportError:
    return False
  return True


@pytest.fixture(scope="module")
def vol(tmp_path_factory):
  path = str(tmp_path_factory.mktemp("peers") / "volume.zarr")
  return comparison.synthetic_volume(path, BUDGET)


def _no_torch(name):
  if name.split(".")[0] in ("torch", "monai", "nnunetv2"):
    raise ImportError(f"No module named {name!r}")
  return importlib.import_module(name)


@pytest.mark.parametrize("peer", peers.PEERS, ids=lambda p: p.name)
def test_missing_extra_names_install(peer):
  note = peers.missing(peer, BUDGET, importer=_no_torch)
  assert note.startswith(f"{peer.name}: skipped, cannot import torch")
  assert "pip install -e '.[peers]'" in note
  assert peers.missing(peer, BUDGET, importer=lambda name: None) == ""


def test_basicunet_needs_six_widths():
  note = peers.missing(peers.BY_NAME[peers.MONAI], budget_lib.SMOKE, importer=lambda name: None)
  assert note == (
    "monai_basicunet: skipped, BasicUNet takes six widths and budget smoke's unet_features "
    "are [4, 8]"
  )


def test_study_logs_skip_line(tmp_path, monkeypatch):
  """A selected peer row without its extra: one line, and no row in the plan."""
  monkeypatch.setattr(peers, "missing", lambda p, b: f"{p.name}: skipped ... {peers.INSTALL}")
  lines = []
  document = comparison.run_study(
    str(tmp_path), budget_lib.SMOKE, rows=["otsu", "monai_*"], log=lines.append
  )
  skipped = [line for line in lines if "skipped" in line]
  assert skipped == [f"monai_basicunet: skipped ... {peers.INSTALL}"]
  assert [r["name"] for r in document["rows"]] == ["otsu"]


def test_selection_defaults():
  select = comparison._select
  own, small = peers.BY_NAME[peers.NNUNET_OWN], peers.BY_NAME[peers.NNUNET_SMALL]
  assert peers.selected(small, None, select) and not peers.selected(own, None, select)
  assert peers.selected(own, ["nnunetv2_2d"], select)
  assert not peers.selected(small, ["nnunetv2_2d"], select)


def test_label_names():
  assert peers.label_names(("pore", "ignore", "solid")) == {
    "background": 0,
    "ignore_1": 1,
    "solid": 2,
    "ignore": 3,
  }


class _Split:
  """A split with one validation block: rows 0..15, columns 0..15 of the first slice."""

  def __init__(self, train_slices):
    self.train_slices = tuple(train_slices)

  def val_pixels(self, z, y0, y1, x0, x1):
    mask = np.zeros((y1 - y0, x1 - x0), bool)
    if z == self.train_slices[0]:
      mask[:16, :16] = True
    return mask


def test_nnunet_dataset(vol, tmp_path):
  channels = tuple(vol.channels)
  train = BUDGET.train_slices
  dataset = peers.write_nnunet_dataset(
    str(tmp_path), vol, _Split(train), channels=channels, eval_slices=BUDGET.eval_slices
  )
  k = len(vol.classes)
  root = tmp_path / peers.DATASET
  assert dataset == json.loads((root / "dataset.json").read_text())
  assert dataset["channel_names"] == {str(i): c for i, c in enumerate(channels)}
  assert dataset["labels"]["background"] == 0 and dataset["labels"]["ignore"] == k
  assert sorted(dataset["labels"].values()) == list(range(k + 1))
  assert dataset["numTraining"] == len(train)
  assert sorted(os.listdir(root / "labelsTr")) == [f"case_{z:04d}.tif" for z in train]
  assert len(os.listdir(root / "imagesTr")) == len(train) * len(channels)
  assert sorted(os.listdir(root / "imagesTs")) == [
    f"case_{BUDGET.eval_slices[0]:04d}_{c:04d}.tif" for c in range(len(channels))
  ]
  for i, z in enumerate(train):
    truth = vol.read_labels(z)
    labels = tifffile.imread(root / "labelsTr" / f"case_{z:04d}.tif")
    assert labels.dtype == np.uint8 and labels.shape == truth.shape
    expect = np.where(truth == volume_lib.IGNORE_LABEL, k, truth)
    if i == 0:
      assert (labels[:16, :16] == k).all()  # the validation block
      expect[:16, :16] = k
    np.testing.assert_array_equal(labels, expect)
  image = tifffile.imread(root / "imagesTr" / f"case_{train[0]:04d}_0001.tif")
  np.testing.assert_array_equal(image, vol.read_image(train[0])[..., 1])


def test_nnunet_labels_ignore():
  labels = np.array([[0, 1, 255], [2, 1, 0]], np.uint8)
  validation = np.array([[False, False, False], [False, True, False]])
  np.testing.assert_array_equal(peers.nnunet_labels(labels, validation, 3), [[0, 1, 3], [2, 3, 0]])


def _cell(vol):
  """Seed 0 of a peer row on `vol`, scored on the budget's evaluation slices."""
  return runs.Cell(vol, tuple(vol.channels), 0, BUDGET.eval_slices, BUDGET.eval_slices)


@pytest.mark.skipif(not _available("torch", "monai"), reason=f"needs {peers.INSTALL}")
def test_monai_row_end_to_end(vol, tmp_path):
  result = peers.run_monai(str(tmp_path), BUDGET, _cell(vol), threads=1)
  assert math.isfinite(result["mean_iou"]) and 0 <= result["mean_iou"] <= 1
  assert result["peer"]["iterations"] == BUDGET.steps and result["params"] > 0
  assert os.path.exists(tmp_path / "result.json")


@pytest.mark.skipif(not _available("torch", "nnunetv2"), reason=f"needs {peers.INSTALL}")
def test_nnunet_row_end_to_end(vol, tmp_path):
  result = peers.run_nnunet(
    str(tmp_path), BUDGET, _cell(vol), plan="small", threads=1, iterations=2
  )
  assert math.isfinite(result["mean_iou"]) and 0 <= result["mean_iou"] <= 1
  peer = result["peer"]
  assert peer["plan"] == "small" and peer["iterations"] == 2
  assert max(peer["patch"]) <= BUDGET.patch
  assert "nnUNetPlans_patch32" == peer["plans_name"]
