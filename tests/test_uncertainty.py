"""Which slice to annotate next: entropy, per-slice scores, ranking, outputs, script."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
import tensorstore as ts

from fibseg_jax import infer
from fibseg_jax.data import volume
from fibseg_jax.eval import uncertainty

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import segment_child  # noqa: E402 - tiny models shared with the other inference tests
import test_infer  # noqa: E402 - its segment() and memory_root() helpers

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(REPO, "experiments", "suggest.py")


def test_entropy_is_the_one_segmentation_writes_with():
  rng = np.random.default_rng(3)
  p = rng.dirichlet(np.ones(4), size=(5, 6)).astype(np.float32)
  np.testing.assert_array_equal(uncertainty.entropy(p), infer.normalised_entropy(p))
  p8 = np.rint(p * 255).astype(np.uint8)
  np.testing.assert_allclose(
    uncertainty.entropy(p8), infer.normalised_entropy(p8.astype(np.float32)), atol=1e-6
  )


def test_entropy_is_zero_when_certain_and_one_when_uniform():
  certain = np.zeros((2, 3, 4), np.uint8)
  certain[..., 2] = 255
  assert np.allclose(uncertainty.entropy(certain), 0)
  uniform = np.full((2, 3, 4), 64, np.uint8)  # uint8 rounding: sums to 256 / 255
  assert np.allclose(uncertainty.entropy(uniform), 1, atol=1e-6)
  two_way = np.array([[0.5, 0.5, 0.0, 0.0]], np.float32)
  assert uncertainty.entropy(two_way)[0] == pytest.approx(np.log(2) / np.log(4))


def test_ranking_leaves_out_annotated_slices():
  scores = [0.1, 0.9, 0.3, 0.3, 0.05]
  assert uncertainty.rank_slices(scores, annotated=[1]) == [
    (2, 0.3),
    (3, 0.3),
    (0, 0.1),
    (4, 0.05),
  ]


def write_probabilities(path, corrupted, shape=(6, 20, 24), classes=3, seed=0):
  """Confident random probabilities, except uniform guesses on the `corrupted` slices."""
  rng = np.random.default_rng(seed)
  labels = rng.integers(0, classes, shape)
  p = np.full((*shape, classes), 10, np.uint8)
  np.put_along_axis(p, labels[..., None], 235, axis=-1)
  for z in corrupted:
    p[z] = 85
  spec = {
    "driver": "zarr3",
    "kvstore": {"driver": "file", "path": str(path)},
    "metadata": {"shape": list(p.shape), "data_type": "uint8"},
    "create": True,
  }
  ts.open(spec).result().write(p).result()
  return str(path)


def write_uncertainty(path, values):
  """A [z, y, x] uint8 array, as segment.py's --uncertainty writes."""
  values = np.asarray(values, np.uint8)
  spec = {
    "driver": "zarr3",
    "kvstore": {"driver": "file", "path": str(path)},
    "metadata": {"shape": list(values.shape), "data_type": "uint8"},
    "create": True,
  }
  ts.open(spec).result().write(values).result()
  return str(path)


def test_slice_uncertainty_of_an_uncertainty_array(tmp_path):
  values = np.zeros((3, 4, 5), np.uint8)
  values[1] = 255
  values[2, :2] = 51
  path = write_uncertainty(tmp_path / "unc.zarr", values)
  np.testing.assert_allclose(uncertainty.slice_uncertainty(path), [0, 1, 0.2 * 2 / 4], atol=1e-6)
  probs = write_probabilities(tmp_path / "probs.zarr", corrupted=[])
  with pytest.raises(ValueError, match=r"--uncertainty=.*probs.zarr: expected uncertainty "):
    uncertainty.slice_uncertainty(probs, kind="uncertainty")
  with pytest.raises(ValueError, match=r"--probabilities=.*unc.zarr: expected probabilities "):
    uncertainty.slice_uncertainty(path, kind="probabilities")
  flat = write_uncertainty(tmp_path / "flat.zarr", np.zeros((4, 5)))
  with pytest.raises(ValueError, match="expected probabilities .* or uncertainty .*, got rank 2"):
    uncertainty.slice_uncertainty(flat)


# Contrast of each slice: the higher, the more confident the model.
CONTRAST = (700, 4000, 1500, 8000, 100, 2500)


def contrast_volume(root):
  rng = np.random.default_rng(0)
  shape = (len(CONTRAST), 40, 36)
  yy, xx = np.mgrid[: shape[1], : shape[2]]
  with volume.create_volume(
    root,
    shape=shape,
    dtype="uint16",
    channels=test_infer.CHANNELS,
    classes=test_infer.CLASSES,
    voxel_size_nm=(50, 25, 25),
    overwrite=True,
  ) as w:
    for k, amplitude in enumerate(CONTRAST):
      pattern = np.stack([np.sin(xx / (5 + c) + k) + np.cos(yy / (4 + c) - k) for c in (0, 1)], -1)
      image = 20000 + amplitude * pattern + rng.normal(0, 20, (*shape[1:], 2))
      w.write_slice(k, image.clip(0, 65535).astype(np.uint16))
    w.commit()
  return root


@pytest.fixture(scope="module")
def segmented():
  """A stack segmented with both --probabilities and --uncertainty, and its labels."""
  vol = volume.open_volume(contrast_volume(test_infer.memory_root("contrast")))
  model, variables = segment_child.pixel_model(1, len(test_infer.CHANNELS))
  variables = jax.tree.map(lambda a: a * 8, variables)  # confident where contrast is high
  out = test_infer.memory_root("seg")
  probs, unc = out + ".probs", out + ".unc"
  test_infer.segment(vol, (model, variables), out, slices=1, probabilities=probs, uncertainty=unc)
  return probs, unc


def test_suggest_from_uncertainty_ranks_like_from_probabilities(segmented, tmp_path):
  probs, unc = segmented
  from_probs = uncertainty.suggest(probs, tmp_path / "p", annotated=[1], top=2)
  from_unc = uncertainty.suggest(unc, tmp_path / "u", annotated=[1], top=2)
  assert from_probs["probabilities"] == probs and from_unc["uncertainty"] == unc
  assert [r["z"] for r in from_unc["ranking"]] == [r["z"] for r in from_probs["ranking"]]
  assert from_unc["suggested"] == from_probs["suggested"] == [4, 0]  # the lowest contrast
  np.testing.assert_allclose(
    from_unc["slice_uncertainty"], from_probs["slice_uncertainty"], atol=1 / 255
  )
  # The test can fail: the slices' scores are far apart compared with the tolerance.
  assert np.min(np.diff(sorted(from_probs["slice_uncertainty"]))) > 4 / 255
  assert (tmp_path / "u" / "uncertainty_top.png").read_bytes()[:4] == b"\x89PNG"


def test_suggest_refuses_labels(segmented):
  labels = segmented[0].removesuffix(".probs")
  with pytest.raises(
    ValueError, match=r"`fibseg segment`'s labels array, not its uncertainty array"
  ):
    uncertainty.slice_uncertainty(labels)


def test_a_corrupted_slice_is_suggested_first(tmp_path):
  probs = write_probabilities(tmp_path / "probs.zarr", corrupted=[1, 4])
  out = tmp_path / "suggest"
  doc = uncertainty.suggest(probs, out, annotated=[1], top=2)
  # Slice 1 is as uncertain but annotated already: slice 4 comes first.
  assert doc["suggested"][0] == 4
  assert doc["ranking"][0]["uncertainty"] == pytest.approx(1.0, abs=1e-6)
  assert [r["z"] for r in doc["ranking"]].count(1) == 0
  assert len(doc["slice_uncertainty"]) == 6
  assert doc["slice_uncertainty"][0] < 0.5
  assert json.loads((out / "suggest.json").read_text()) == doc
  for name in ("uncertainty_z.png", "uncertainty_top.png"):
    assert (out / name).read_bytes()[:4] == b"\x89PNG"


def test_script(tmp_path):
  probs = write_probabilities(tmp_path / "probs.zarr", corrupted=[3])
  run = lambda *flags: subprocess.run(  # noqa: E731
    [sys.executable, SCRIPT, *flags], capture_output=True, text=True, timeout=120
  )
  proc = run(f"--probabilities={probs}", f"--out={tmp_path / 's'}", "--annotated=0,5", "--top=1")
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert "1. slice 3: uncertainty 1.0000" in proc.stdout
  proc = run(
    f"--probabilities={tmp_path / 'none.zarr'}", f"--out={tmp_path / 's'}", "--annotated=0"
  )
  assert proc.returncode == 1 and "Traceback" not in proc.stderr
  assert "none.zarr" in proc.stderr

  values = np.full((6, 4, 4), 20, np.uint8)
  values[2] = 200
  unc = write_uncertainty(tmp_path / "unc.zarr", values)
  proc = run(f"--uncertainty={unc}", f"--out={tmp_path / 'u'}", "--annotated=0", "--top=1")
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert f"1. slice 2: uncertainty {200 / 255:.4f}" in proc.stdout
  for flags in ([f"--uncertainty={unc}", f"--probabilities={probs}"], []):
    proc = run(*flags, f"--out={tmp_path / 'x'}", "--annotated=0")
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert "error: give exactly one of --uncertainty=unc.zarr or --probabilities" in proc.stderr
  proc = run(f"--uncertainty={probs}", f"--out={tmp_path / 'x'}", "--annotated=0")
  assert proc.returncode == 1 and "Traceback" not in proc.stderr
  assert f"error: --uncertainty={probs}: expected uncertainty [z, y, x], got rank 4" in proc.stderr


def test_disagreement_is_zero_when_members_agree_however_unsure():
  confident = np.array([[0.98, 0.02], [0.02, 0.98]], np.float32)
  flipped = confident[:, ::-1]
  unsure = np.full((2, 2), 0.5, np.float32)
  assert np.allclose(uncertainty.disagreement([unsure, unsure, unsure]), 0, atol=1e-6)
  assert np.allclose(uncertainty.entropy(unsure), 1)  # entropy calls it the worst slice
  d = uncertainty.disagreement([confident, flipped])
  assert (d > 0.8).all() and (d <= 1).all()
  u8 = [np.rint(255 * m).astype(np.uint8) for m in (confident, flipped)]
  assert np.allclose(uncertainty.disagreement(u8), d, atol=0.02)
  with pytest.raises(ValueError, match=">= 2 members"):
    uncertainty.disagreement([confident])


def test_the_ranking_spreads_along_z():
  # Scores peak around the annotated slice 10: entropy-first would take 9 and 11.
  scores = [0.1] * 24
  for z, s in {9: 0.9, 11: 0.88, 12: 0.8, 8: 0.7, 3: 0.5, 20: 0.4}.items():
    scores[z] = s
  ranking = uncertainty.rank_slices(scores, annotated=[10])
  assert [z for z, _ in ranking[:2]] == [9, 11]
  gap = uncertainty.default_gap(24, annotated=1, top=3)
  assert gap == 3
  chosen = uncertainty.choose_spread(ranking, [10], 3, gap)
  assert chosen == [3, 20, 0]  # 9, 11, 12 and 8 lie within 3 of slice 10
  assert 9 not in chosen and 11 not in chosen
  # When the gap leaves too few slices it is relaxed, never more than the slices left.
  few = uncertainty.choose_spread(uncertainty.rank_slices([1, 2, 3], [1]), [1], 5, 4)
  assert sorted(few) == [0, 2]


def _members(tmp_path, shape=(8, 12, 12), classes=3):
  """Three members: confident and agreeing, except on slices 4 and 5 (confident and
  contradicting: member m votes class m) and slice 2 (all uniform, agreeing)."""
  rng = np.random.default_rng(0)
  labels = rng.integers(0, classes, shape)
  paths = []
  for m in range(3):
    p = np.full((*shape, classes), 10, np.uint8)
    np.put_along_axis(p, labels[..., None], 235, axis=-1)
    p[4:6] = 10
    p[4:6, ..., m] = 235
    p[2] = 85
    path = str(tmp_path / f"p{m}.zarr")
    spec = {
      "driver": "zarr3",
      "kvstore": {"driver": "file", "path": path},
      "metadata": {"shape": list(p.shape), "data_type": "uint8"},
      "create": True,
    }
    ts.open(spec).result().write(p).result()
    paths.append(path)
  return paths


def test_suggest_by_disagreement_skips_agreed_blur_and_states_the_narrowing(tmp_path):
  paths = _members(tmp_path)
  doc = uncertainty.suggest(paths, tmp_path / "s", annotated=[0], top=2, min_gap=2)
  assert doc["suggested"][0] in (4, 5)  # not slice 2, where entropy alone would point
  assert abs(doc["suggested"][1] - doc["suggested"][0]) >= 2  # not both of 4 and 5
  assert doc["probabilities"] == paths and "disagreement" in doc["measure"]
  rows = {r["z"]: r for r in doc["ranking"]}
  # Members split 3 ways on slices 4, 5: each phase's stack fraction has a range there,
  # and annotating one of them narrows it; annotating an agreed slice narrows nothing.
  lo, hi = doc["fraction_interval"]["class0"]
  assert hi - lo > 0.1
  assert rows[4]["expected_narrowing"]["class0"] > 0.05
  assert abs(rows[2]["expected_narrowing"]["class0"]) < 1e-9
  entropy_doc = uncertainty.suggest(paths[0], tmp_path / "e", annotated=[0], top=1)
  assert entropy_doc["suggested"] == [2]
  proc = subprocess.run(
    [sys.executable, SCRIPT, f"--probabilities={','.join(paths)}", f"--out={tmp_path / 'c'}"]
    + ["--annotated=0", "--top=1"],
    capture_output=True,
    text=True,
    timeout=120,
  )
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert (
    "1. slice 4" in proc.stdout and "narrows the phase-fraction ranges by class0" in proc.stdout
  )
