"""Which slice to annotate next: entropy, per-slice scores, ranking, outputs, script."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import tensorstore as ts

from fibseg_jax.eval import uncertainty

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(REPO, "experiments", "suggest.py")


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
