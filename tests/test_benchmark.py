"""experiments/benchmark.py on tiny shapes, fibseg_jax side only: the suite needs no torch."""

import importlib.util
import json
import math
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(REPO, "experiments", "benchmark.py")
# One pooling, four features: compiles in seconds; the measurements are the same code.
TINY = {"depth": 1, "features": (4, 4)}


@pytest.fixture(scope="module")
def bench():
  spec = importlib.util.spec_from_file_location("fibseg_benchmark", SCRIPT)
  module = importlib.util.module_from_spec(spec)
  sys.modules[spec.name] = module  # dataclasses look their module up there
  spec.loader.exec_module(module)
  yield module
  del sys.modules[spec.name]


def tiny_options(bench, **changes):
  fields = dict(
    batch=2,
    size=32,
    steps=1,
    warmup=1,
    peer="none",
    loader_shape=(3, 64, 64),
    loader_chunks=(32, 64),
    loader_batches=1,
    model_overrides=TINY,
  )
  fields.update(changes)
  return bench.Options(**fields)


def no_torch(name):
  if name.split(".")[0] in ("torch", "monai"):
    raise ImportError(f"No module named {name!r}")
  return importlib.import_module(name)


def positive_finite(value):
  return isinstance(value, int | float) and math.isfinite(value) and value > 0


@pytest.fixture(scope="module")
def result(bench):
  """One tiny run of every phase that asks for the peer on a machine without torch."""
  result = bench.run(tiny_options(bench, peer="monai"), importer=no_torch)
  return result, json.loads(json.dumps(result))  # all of it must survive --out


def test_run_reports_every_figure(bench, result):
  result, reloaded = result
  result = reloaded
  for key in ("command", "versions", "host", "jax_device", "options", "load_average", "model"):
    assert key in result, key
  assert {"jax", "flax", "optax", "tensorstore"} <= set(result["versions"])
  assert len(result["load_average"]["start"]) == 3
  assert result["jax_device"]["backend"] == jax.default_backend()

  train = result["frameworks"]["fibseg_jax"]["train"]
  infer = result["frameworks"]["fibseg_jax"]["infer"]
  for phase in (train, infer):
    for key in ("first_step_s", "step_s_median", "patches_per_s", "mpixel_per_s"):
      assert positive_finite(phase[key]), (key, phase[key])
    assert len(phase["step_s"]) == 1 and len(phase["warmup_s"]) == 1
    assert phase["patches_per_s"] == pytest.approx(2 / phase["step_s_median"])
    assert phase["mpixel_per_s"] == pytest.approx(phase["patches_per_s"] * 32 * 32 / 1e6)
    assert math.isfinite(phase["memory"]["peak_mib"]) and phase["memory"]["peak_mib"] >= 0
  model = bench.models.build(bench.model_config(tiny_options(bench)))
  sample = np.zeros((1, 3, 32, 32, 2), np.float32)
  abstract = jax.eval_shape(lambda: model.init(bench.init_key(), sample, train=False))
  assert train["params"] == bench.models.count_params(abstract)
  assert math.isfinite(train["final_loss"]) and train["final_loss"] > 0

  rows = result["data_path"]
  assert [r["chunk_yx"] for r in rows] == [32, 64]
  for r in rows:
    for key in ("write_s", "stored_mib", "patches_per_s_uncached", "patches_per_s_cached"):
      assert positive_finite(r[key]), (key, r[key])
  assert rows[0]["read_amplification"] == pytest.approx((1 + 31 / 32) ** 2)

  table = bench.markdown(result)
  assert "| fibseg_jax | train |" in table and "| fibseg_jax | infer |" in table
  assert "| 64 |" in table


def test_missing_peer_is_a_note_not_a_crash(bench, result):
  result, _ = result
  assert list(result["frameworks"]) == ["fibseg_jax"]
  assert "torch" not in result["versions"]
  assert any("cannot import the peer" in note for note in result["notes"])

  peer = bench.load_peer(tiny_options(bench, peer="monai"), importer=no_torch)
  assert not peer.available
  assert "cannot import the peer" in peer.note and "pip install torch==2.13.0" in peer.note
  peer = bench.load_peer(tiny_options(bench, peer="none"), importer=no_torch)
  assert not peer.available and "--peer=none" in peer.note


def test_sensor3d_has_no_peer(bench):
  peer = bench.load_peer(tiny_options(bench, peer="monai", model="sensor3d"), importer=no_torch)
  assert not peer.available and "no MONAI peer" in peer.note


def test_peer_input_has_the_unet_feature_order(bench):
  image = np.random.default_rng(0).standard_normal((2, 3, 4, 5, 2), dtype=np.float32)
  nchw = bench.as_features_first(image)
  assert nchw.shape == (2, 6, 4, 5)
  # Feature s * channels + c, as the 2.5D U-Net folds a slab.
  assert nchw[1, 2 * 2 + 1, 3, 4] == image[1, 2, 3, 4, 1]
  folded = np.transpose(image, (0, 2, 3, 1, 4)).reshape(2, 4, 5, 6)
  np.testing.assert_array_equal(nchw.transpose(0, 2, 3, 1), folded)


def test_read_amplification(bench):
  assert bench.read_amplification(256, 256) == pytest.approx((1 + 255 / 256) ** 2)
  # Smaller chunks waste less of what they decode.
  assert bench.read_amplification(256, 128) < bench.read_amplification(256, 512)


def test_memory_meter_sees_an_allocation(bench):
  if bench.psutil is None:
    pytest.skip("psutil not installed: only the lifetime peak is known")
  with bench.MemoryMeter() as meter:
    block = np.ones(64 << 20, np.uint8)  # touched, so resident
  assert meter.result()["peak_mib"] >= 48
  del block


@pytest.mark.parametrize(
  "changes, flag",
  [
    ({"size": 31}, "--size=31"),
    ({"which": ("train", "bogus")}, "--which"),
    ({"slices": 2}, "--slices=2"),
    ({"loader_shape": (3, 16, 16)}, "--loader_shape"),
  ],
)
def test_bad_options_name_the_flag(bench, changes, flag):
  with pytest.raises(bench.BenchmarkError, match=flag):
    bench.check_options(tiny_options(bench, **changes))


def test_command_line_error_is_one_line():
  proc = subprocess.run(
    [sys.executable, SCRIPT, "--size=30", "--peer=none", "--which=infer"],
    capture_output=True,
    text=True,
    timeout=120,
  )
  assert proc.returncode == 1
  assert "error: --size=30" in proc.stderr
  assert "Traceback" not in proc.stderr
