"""Calibrated error bars (fibseg_jax.eval.calibration): volume fractions corrected by the
errors measured on the held-out validation blocks hold the truth where the members'
range does not."""

import json
import os
import sys

import numpy as np
import pytest
from scipy import ndimage

from fibseg_jax import eval as evaluation
from fibseg_jax.data import volume
from fibseg_jax.eval import calibration, quantify

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from test_eval import write_prediction  # noqa: E402 - a segmentation as segment writes it

CLASSES = ("pore", "solid", "grain")
SHAPE = (8, 96, 96)
ANNOTATED = (1, 3, 5)
VOXEL = (50.0, 25.0, 25.0)


def _truth(seed):
  """Three phases from a smooth random field: blobs of a few tens of pixels."""
  rng = np.random.default_rng(seed)
  field = ndimage.gaussian_filter(rng.normal(size=SHAPE), (1, 4, 4))
  low, high = np.percentile(field, (15, 70))
  return np.digitize(field, [low, high]).astype(np.uint8)


def _member(truth, seed):
  """A model that errs the same way everywhere: the pore rim goes to the solid (a bias
  every member shares) and 4% of the voxels get a random class (its own noise)."""
  rng = np.random.default_rng(seed)
  pore = truth == 0
  eroded = ndimage.binary_erosion(pore, structure=np.ones((1, 3, 3), bool))
  out = np.where(pore & ~eroded, 1, truth).astype(np.uint8)
  flip = rng.random(SHAPE) < 0.04
  out[flip] = rng.integers(0, len(CLASSES), int(flip.sum()))
  return out


def _volume(root, truth):
  with volume.create_volume(
    root, shape=SHAPE, dtype="uint8", channels=("EM",), classes=CLASSES, voxel_size_nm=VOXEL
  ) as w:
    for z in range(SHAPE[0]):
      w.write_slice(z, (60 * truth[z])[..., None], truth[z] if z in ANNOTATED else None)
    w.commit()
  return volume.open_volume(root)


def test_calibrated_fractions_hold_the_truth_in_most_seeds_where_the_range_does_not(tmp_path):
  calibrated, ranged, total = 0, 0, 0
  for seed in range(5):
    truth = _truth(seed)
    vol = _volume(str(tmp_path / f"v{seed}.zarr"), truth)
    preds = [_member(truth, 10 * seed + m) for m in range(2)]
    members = [quantify.quantify(p, CLASSES, VOXEL) for p in preds]
    blocks = [calibration.held_out_blocks(vol, p, val_block=16) for p in preds]
    assert all(len(b) >= 4 for b in blocks)
    for truth_block, _ in blocks[0]:  # only validation pixels carry the truth
      assert (truth_block != 255).any()
    interval = calibration.calibrated_intervals(members, blocks, "2 members", seed=seed)
    spread = quantify.intervals(members, "2 members")
    exact = quantify.quantify(truth, CLASSES, VOXEL)
    for name, entry in quantify.coverage(interval, exact).items():
      calibrated += entry["volume_fraction"]
      ranged += quantify.coverage(spread, exact)[name]["volume_fraction"]
      total += 1
  # 15 (seed, phase) fractions: the shared bias puts the truth outside the members'
  # range; the correction by the blocks' confusion brings it inside most intervals.
  assert ranged <= 0.2 * total
  assert calibrated >= 0.8 * total


def test_corrected_fractions_invert_a_known_confusion():
  p = np.array([0.2, 0.5, 0.3])
  confusion = np.array([[80, 20, 0], [5, 90, 5], [0, 10, 90]], float)
  q = (confusion / confusion.sum(1, keepdims=True)).T @ p
  np.testing.assert_allclose(calibration.corrected_fractions(q, confusion), p, atol=1e-9)
  # A class without held-out pixels keeps its predicted share (identity row).
  confusion[2] = 0
  out = calibration.corrected_fractions(np.array([0.3, 0.3, 0.4]), confusion)
  assert out.sum() == pytest.approx(1) and (out >= 0).all()


def _write_segmentation(path, labels, checkpoint):
  write_prediction(path, labels, CLASSES, run={"checkpoint": checkpoint})


def test_evaluate_calibrates_members_whose_training_split_it_can_read(tmp_path):
  truth = _truth(0)
  root = str(tmp_path / "vol.zarr")
  _volume(root, truth)
  # A checkpoint's saved config, as orbax writes it (checkpoints/<step>/config/metadata).
  checkpoint = tmp_path / "run" / "checkpoints" / "40"
  (checkpoint / "config").mkdir(parents=True)
  data = {"eval_slices": "", "val_fraction": 0.25, "val_block": 16, "split_seed": 0}
  (checkpoint / "config" / "metadata").write_text(json.dumps({"data": data}))
  assert calibration.training_split({"checkpoint": str(checkpoint)}) == {
    "eval_slices": (),
    "val_fraction": 0.25,
    "val_block": 16,
    "split_seed": 0,
  }
  assert calibration.training_split({"checkpoint": ["a", "b"]}) is None  # an ensemble's
  paths = []
  for m in range(2):
    paths.append(str(tmp_path / f"seg{m}.zarr"))
    _write_segmentation(paths[-1], _member(truth, m), str(checkpoint))
  report = evaluation.evaluate(paths[0], root, members=paths[1:], slices=list(ANNOTATED))
  iv = report.intervals
  assert iv["calibrated"] == ["volume_fraction"]
  assert iv["calibration"].startswith("volume fraction: 95% bootstrap interval")
  spread = quantify.intervals(
    [quantify.quantify(_member(truth, m), CLASSES, VOXEL) for m in (1, 0)], "2"
  )
  pore = iv["phases"]["pore"]["volume_fraction"]
  assert pore["min"] > spread["phases"]["pore"]["volume_fraction"]["max"]  # moved up
  # The surface density keeps the members' range.
  sv, ranged = (x["phases"]["pore"]["surface_density_per_um"] for x in (iv, spread))
  assert (sv["min"], sv["max"]) == pytest.approx((ranged["min"], ranged["max"]))
  out = str(tmp_path / "report")
  evaluation.write_report(report, out)
  text = open(os.path.join(out, "report.md")).read()
  assert "| pore | volume fraction |" in text and "| calibrated |" in text
  # Without a readable split, the ranges stay and the report says why.
  missing = str(tmp_path / "seg_other.zarr")
  _write_segmentation(missing, _member(truth, 3), str(tmp_path / "gone"))
  report = evaluation.evaluate(paths[0], root, members=[missing], slices=list(ANNOTATED))
  assert report.intervals["calibration"].startswith("not done: no single training checkpoint")
