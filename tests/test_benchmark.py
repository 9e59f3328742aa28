"""fibseg_jax.bench on tiny networks, fibseg_jax side only: the suite needs no torch.

Never asserts a speed: only that every figure is measured, written, and computed right.
"""

import importlib
import json
import math
import os
import subprocess
import sys
import tempfile

import jax
import numpy as np
import pytest

from fibseg_jax import bench, infer, models
from fibseg_jax.bench import (
  figures,
  jax_side,
  machine,
  peer,
  report,
  segment_memory,
  segment_race,
  timing,
)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(REPO, "experiments", "benchmark.py")
# One pooling, four features: compiles in seconds; the measurements are the same code.
TINY = {"depth": 1, "features": (4, 4)}


def tiny_options(**changes):
  fields = dict(
    batch=2,
    size=32,
    steps=1,
    warmup=1,
    peer="none",
    loader_shape=(3, 64, 64),
    loader_chunks=(32, 256),
    loader_batches=1,
    segment_shape=(2, 64, 64),
    segment_tile=32,
    segment_overlap=8,
    segment_batch=4,
    segment_block=64,
    matmul_size=64,
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
def written(tmp_path_factory):
  """One tiny run of everything, written as the script writes it, and read back."""
  result = bench.run(
    tiny_options(peer="monai"),
    importer=no_torch,
    command=["experiments/benchmark.py", "--out=bench/", "--quick"],
  )
  out = tmp_path_factory.mktemp("bench")
  json_path, md_path = report.write(result, str(out))
  with open(json_path) as f:
    reloaded = json.load(f)
  with open(md_path) as f:
    md = f.read()
  return result, reloaded, md


def test_every_key_is_written(written):
  result, reloaded, _ = written
  assert set(bench.KEY_NAMES) <= set(reloaded)
  assert len(bench.KEY_NAMES) == 10 + 6
  for name in bench.KEY_NAMES:
    value = reloaded[name]
    assert value is None or positive_finite(value), (name, value)
    assert (value is None) == (name in reloaded["notes"]), name
    assert reloaded["targets"][name] == figures.KEYS[bench.KEY_NAMES.index(name)].target_text
  # No peer here (model overrides, and no torch): the speedups are null, and say why.
  for name in ("train_speedup_vs_monai", "infer_speedup_vs_monai"):
    assert reloaded[name] is None and "BasicUNet" in reloaded["notes"][name]
    assert reloaded["status"][name] == "n.a."
  for name in (
    "train_flop_utilisation",
    "loader_headroom",
    "loader_headroom_full_recipe",
    "segment_rss_ratio",
  ):
    assert positive_finite(reloaded[name]), name
  assert reloaded["targets"]["loader_headroom"] == ">= 10"
  assert reloaded["targets"]["sensor3d_step_ratio"] == "<= 2.5"


def test_figures_follow_from_the_details(written):
  _, r, _ = written
  d = r["details"]
  study = d["study"]
  assert list(study) == [c.name for c in bench.STUDY]
  for c in bench.STUDY:
    entry = study[c.name]
    assert r[figures.step_key(c.name)] == entry["step_s_median"]
    assert entry["slices"] == c.slices and entry["channels"] == list(c.channels)
    assert len(entry["step_s"]) == 1 and len(entry["warmup_s"]) == 1
    assert positive_finite(entry["flops"]) and math.isfinite(entry["final_loss"])
  # The raced train step is the unet_both_3 study entry.
  assert study["unet_both_3"] == d["race"]["train"]["fibseg_jax"]
  assert r["sensor3d_step_ratio"] == pytest.approx(
    study["sensor3d_both_3"]["step_s_median"] / study["unet_both_3"]["step_s_median"]
  )
  step = study["unet_both_3"]["step_s_median"]
  flop_rate = study["unet_both_3"]["flops"] / step
  assert r["train_flop_utilisation"] == pytest.approx(flop_rate / d["matmul"]["flops_per_s"])
  assert d["matmul"]["flops"] == 2 * 64**3
  # Headroom reads the default-chunk (256) row of the loader, uncached.
  row = d["data_path"]["headroom_row"]
  assert row["chunk_yx"] == 256 and [x["chunk_yx"] for x in d["data_path"]["rows"]] == [32, 256]
  assert r["loader_headroom"] == pytest.approx(row["patches_per_s_uncached"] / (2 / step))
  assert r["loader_headroom_full_recipe"] == pytest.approx(
    row["patches_per_s_uncached_full_recipe"] / (2 / step)
  )
  assert 0 < row["patches_per_s_uncached_full_recipe"]

  # Parameter counts of the tiny 2.5D U-Net: one input feature per slice and signal.
  model = models.build(bench.options.model_config(tiny_options(), "unet"))
  sample = np.zeros((1, 1, 32, 32, 1), np.float32)
  abstract = jax.eval_shape(lambda: model.init(jax_side.init_key(), sample, train=False))
  assert study["unet_ice_1"]["params"] == models.count_params(abstract)
  assert study["unet_both_3"]["params"] > study["unet_ice_1"]["params"]


def test_segmentation_children(written):
  _, r, _ = written
  seg = r["details"]["segmentation"]
  small, large = seg["children"]["1x"], seg["children"]["4x"]
  assert seg["volumes"] == {"1x": [2, 64, 64], "4x": [8, 64, 64]}
  assert small["complete"] and large["complete"]
  assert small["mpixels"] == pytest.approx(2 * 64 * 64 / 1e6)
  assert large["mpixels"] == pytest.approx(4 * small["mpixels"])
  assert small["peak_rss_mib"] >= small["rss_before_mib"] > 50  # a python with jax
  assert r["segment_rss_ratio"] == pytest.approx(large["peak_rss_mib"] / small["peak_rss_mib"])
  # Region 64 + 2 x 8 = 80 px -> 3 x 3 tiles of 32 a block; batches of 4: 4, 4, 1.
  assert seg["forward_calls"]["1x"] == {"4x32x32": 4, "1x32x32": 2}
  assert seg["forward_calls"]["4x"] == {"4x32x32": 16, "1x32x32": 8}
  if r["segment_efficiency"] is None:  # tiny volumes: the 4x run may be no slower
    assert "too small" in r["notes"]["segment_efficiency"]
  else:
    extra_bare = seg["bare_s"]["4x"] - seg["bare_s"]["1x"]
    extra_seconds = large["seconds"] - small["seconds"]
    assert r["segment_efficiency"] == pytest.approx(extra_bare / extra_seconds)


def test_segment_default_path_and_race_figures(written):
  _, r, _ = written
  race = r["details"]["segment_race"]
  z, y, x = race["shape"]
  assert race["settings"] == {"tile": 768, "overlap": 64, "batch": 2}  # the defaults
  assert r["segment_mpx_per_s"] == pytest.approx(z * y * x / 1e6 / race["default"]["step_s_median"])
  # No peer here: the race is not run, and the note says why.
  assert r["segment_race_vs_monai"] is None and "BasicUNet" in r["notes"]["segment_race_vs_monai"]


def test_markdown_and_printed_table(written):
  result, reloaded, md = written
  env = reloaded["environment"]
  assert env["command"].endswith("experiments/benchmark.py --out=bench/ --quick")
  assert {"jax", "jaxlib", "flax", "optax", "tensorstore"} <= set(env["versions"])
  assert env["machine"]["cores_usable"] >= 1 and env["machine"]["cpu"]
  assert len(reloaded["load_average"]["start"]) == 3
  for text in (env["machine"]["cpu"], "jaxlib " + env["versions"]["jaxlib"], env["command"]):
    assert text in md
  for name in bench.KEY_NAMES:
    assert f"| {name} |" in md
  assert "| fibseg_jax | train |" in md and "| sensor3d_both_3 |" in md and "| 256 |" in md
  table = report.key_table(result).splitlines()
  assert table[0].split() == ["key", "value", "target", "status"]
  rows = {line.split()[0]: line.split() for line in table[2 : 2 + len(bench.KEY_NAMES)]}
  assert list(rows) == list(bench.KEY_NAMES)
  assert rows["train_speedup_vs_monai"][1:] == ["null", ">=", "1.2", "n.a."]
  assert rows["segment_rss_ratio"][2:4] == ["<=", "1.15"]
  assert any(line.startswith("train_speedup_vs_monai: ") for line in table)


def test_peer_notes():
  options = tiny_options(peer="monai", model_overrides={})
  missing = peer.load_peer(options, importer=no_torch)
  assert not missing.available
  assert "cannot import the peer" in missing.note and "pip install torch==2.13.0" in missing.note
  none = peer.load_peer(tiny_options(peer="none"), importer=no_torch)
  assert not none.available and "--peer=none" in none.note
  overridden = peer.load_peer(tiny_options(peer="monai"), importer=no_torch)
  assert not overridden.available and "BasicUNet" in overridden.note


def test_race_against_monai_when_installed():
  """The peer path, where torch and monai are installed (`make bench`); skipped in CI."""
  from fibseg_jax.bench import benchmark  # noqa: PLC0415

  pytest.importorskip("monai")
  # BasicUNet's layout with four features at every level.
  options = tiny_options(peer="monai", steps=2, model_overrides={"features": (4,) * 6})
  the_peer = peer.load_peer(options)
  assert the_peer.available, the_peer.note
  device = peer.torch_setup(the_peer, 1)["device"]
  train = benchmark._race_train(options, the_peer, device)
  infer_race = benchmark._race_infer(options, the_peer, device)
  assert train["fibseg_jax"]["params"] == train["monai"]["params"]
  for sides in (train, infer_race):
    for r in sides.values():
      assert len(r["step_s"]) == 2 and positive_finite(r["step_s_median"])
  # Random logits over 4 classes: cross-entropy ~ log 4, plus a Dice term in [0, 1].
  for name in ("fibseg_jax", "monai"):
    assert math.log(4) - 1 < train[name]["final_loss"] < math.log(4) + 1.5
  # The segmentation race: our weights in MONAI's BasicUNet agree on a tile.
  with tempfile.TemporaryDirectory() as workdir:
    seg = segment_race.measure(options, workdir, the_peer, shape=(2, 64, 64))
  assert seg["agreement"] < segment_race.AGREEMENT
  assert seg["segment_race_vs_monai"] == pytest.approx(
    seg["race"]["monai"]["step_s_median"] / seg["race"]["fibseg_jax"]["step_s_median"]
  )


def test_ratios_and_status():
  assert figures.ratio(3.0, 2.0) == 1.5
  assert figures.ratio(None, 2.0) is None and figures.ratio(1.0, 0.0) is None
  # 10 GFLOP in 0.5 s against a 100 GFLOP/s matmul: 20% of it.
  assert figures.flop_utilisation(10e9, 0.5, 100e9) == pytest.approx(0.2)
  assert figures.flop_utilisation(None, 0.5, 100e9) is None
  # Batch 8 every 2 s consumes 4 patches/s; a loader at 120 patches/s has 30x headroom.
  assert figures.loader_headroom(120.0, 8, 2.0) == pytest.approx(30.0)
  minimum = figures.Key("k", 1.2, True, "")
  maximum = figures.Key("k", 2.5, False, "")
  assert [minimum.status(v) for v in (1.3, 1.2, 1.1, None)] == ["met", "met", "not met", "n.a."]
  assert [maximum.status(v) for v in (2.0, 2.6)] == ["met", "not met"]
  assert figures.Key("k", None, False, "").status(3.0) == "n.a."


def test_segment_efficiency_uses_the_extra_work():
  small = {"seconds": 5.0, "mpixels": 1.0}
  large = {"seconds": 17.0, "mpixels": 4.0}
  # 3 extra Mpixel in 12 s; the bare forward needs 9 s of the 12: efficiency 0.75.
  out = segment_memory.efficiency(small, large, small_bare_s=3.0, large_bare_s=12.0)
  assert out["efficiency"] == pytest.approx(0.75)
  assert out["segment_mpixel_per_s"] == pytest.approx(0.25)
  assert out["bare_mpixel_per_s"] == pytest.approx(3 / 9)
  noisy = segment_memory.efficiency(small, {"seconds": 4.0, "mpixels": 4.0}, 3.0, 12.0)
  assert noisy["efficiency"] is None and "too small" in noisy["note"]
  assert segment_memory.bare_seconds(
    {(4, 8, 8): 3, (1, 8, 8): 2}, {(4, 8, 8): 0.5, (1, 8, 8): 0.1}
  ) == pytest.approx(1.7)


def test_tile_batches_follow_the_segmentation_plan():
  options = tiny_options(segment_block=512, segment_tile=32, segment_overlap=8, segment_batch=4)
  spec = segment_memory.spec_for(options, "unused", "unused")
  model, variables = segment_memory._model_and_variables(spec)
  predictor = infer.TilePredictor(
    model, variables, offset=[0, 0], scale=[1, 1], overlap=8, batch=spec["batch"]
  )
  # One 100 x 70 block a slice; region 116 x 86: 5 x 4 = 20 tiles = 5 full batches of 4,
  # each tile fitted to the region (30 x 28 cover it as 5 x 4 tiles of 32 would).
  assert segment_memory.tile_batches((3, 100, 70), spec, predictor) == {(4, 30, 28): 15}
  # 600 x 40: blocks 512 and 88 high; regions 528 and 104 high (22 and 4 tile rows), 56
  # wide (2 columns): 44 and 8 tiles, in batches of 3 with a padded remainder of 2 each.
  predictor = infer.TilePredictor(model, variables, offset=[0, 0], scale=[1, 1], overlap=8, batch=3)
  counts = segment_memory.tile_batches((1, 600, 40), spec, predictor)
  assert counts == {(3, 32, 32): 14 + 2, (predictor.padded_size(2), 32, 32): 2}


class Recorder:
  """A side that records the order it ran in."""

  def __init__(self, name, log):
    self.name, self.log, self.params = name, log, 1
    self.prepared = False

  def prepare(self):
    self.prepared = True

  def __call__(self):
    assert self.prepared
    self.log.append(self.name)

  def device_peak(self):
    return None


def test_race_warms_up_each_side_then_alternates():
  log = []
  sides = {"a": Recorder("a", log), "b": Recorder("b", log)}
  checked = []
  results = timing.race(sides, steps=3, warmup=2, check=lambda: checked.append(list(log)))
  assert checked == [["a", "a", "b", "b"]]  # warm-ups side by side, before the check
  assert log[4:] == ["a", "b", "b", "a", "a", "b"]  # the first side rotates
  for r in results.values():
    assert len(r["step_s"]) == 3 and len(r["warmup_s"]) == 2
    assert r["step_s_min"] <= r["step_s_median"] <= r["step_s_max"]
    assert r["memory"]["peak_mib"] >= 0


def test_race_refuses_different_networks():
  from fibseg_jax.bench import benchmark  # noqa: PLC0415

  log = []
  sides = {"fibseg_jax": Recorder("a", log), "monai": Recorder("b", log)}
  sides["monai"].params = 2
  with pytest.raises(bench.BenchmarkError, match="parameter counts differ"):
    timing.race(sides, 3, 1, benchmark._check_same_network(sides))
  assert log == ["a", "b"]  # nothing timed


def test_compiled_flops_of_a_matmul():
  x = jax.numpy.ones((32, 32))
  compiled = jax.jit(jax.numpy.dot).lower(x, x).compile()
  assert jax_side.compiled_flops(compiled) == 2 * 32**3


def test_peer_input_has_the_unet_feature_order():
  image = np.random.default_rng(0).standard_normal((2, 3, 4, 5, 2), dtype=np.float32)
  nchw = peer.as_features_first(image)
  assert nchw.shape == (2, 6, 4, 5)
  # Feature s * channels + c, as the 2.5D U-Net folds a slab.
  assert nchw[1, 2 * 2 + 1, 3, 4] == image[1, 2, 3, 4, 1]
  folded = np.transpose(image, (0, 2, 3, 1, 4)).reshape(2, 4, 5, 6)
  np.testing.assert_array_equal(nchw.transpose(0, 2, 3, 1), folded)


def test_read_amplification():
  from fibseg_jax.bench import data_path  # noqa: PLC0415

  assert data_path.read_amplification(256, 256) == pytest.approx((1 + 255 / 256) ** 2)
  # Smaller chunks waste less of what they decode.
  assert data_path.read_amplification(256, 128) < data_path.read_amplification(256, 512)


def test_memory_meter_sees_an_allocation():
  if machine.psutil is None:
    pytest.skip("psutil not installed: only the lifetime peak is known")
  with machine.MemoryMeter() as meter:
    block = np.ones(64 << 20, np.uint8)  # touched, so resident
  assert meter.result()["peak_mib"] >= 48
  assert machine.peak_rss_mib() >= 64
  del block


def test_quick_preset():
  quick = bench.make_options(quick=True, steps=None, peer="none")
  fields = (quick.quick, quick.batch, quick.size, quick.steps, quick.peer)
  assert fields == (True, 4, 128, 3, "none")
  bench.check_options(quick)
  assert bench.make_options(batch=2).batch == 2 and bench.make_options().size == 256
  assert bench.parse_ints(["1", "2", "3"], "segment_shape", 3) == (1, 2, 3)
  with pytest.raises(bench.BenchmarkError, match="--segment_shape=1,2: expected 3"):
    bench.parse_ints(["1", "2"], "segment_shape", 3)
  with pytest.raises(bench.BenchmarkError, match="--loader_chunks=a"):
    bench.parse_ints(["a"], "loader_chunks")


@pytest.mark.parametrize(
  "changes, flag",
  [
    ({"size": 31}, "--size=31"),
    ({"steps": 0}, "--steps=0"),
    ({"peer": "keras"}, "--peer=keras"),
    ({"loader_shape": (3, 16, 16)}, "--loader_shape=3,16,16"),
    ({"loader_chunks": ()}, "--loader_chunks"),
    ({"segment_tile": 33}, "--segment_tile=33"),
    ({"segment_overlap": 32}, "--segment_overlap=32"),
    ({"segment_block": 700}, "--segment_block=700"),
    ({"segment_shape": (0, 64, 64)}, "--segment_shape=0,64,64"),
  ],
)
def test_bad_options_name_the_flag(changes, flag):
  with pytest.raises(bench.BenchmarkError, match=flag):
    bench.check_options(tiny_options(**changes))


def test_command_line_errors_are_one_line(tmp_path):
  for args, message in (
    (["--out", str(tmp_path), "--size=30", "--peer=none"], "error: --size=30"),
    (["--peer=none"], "error: --out is required"),
  ):
    proc = subprocess.run(
      [sys.executable, SCRIPT, *args], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 1, proc.stderr
    assert message in proc.stderr
    assert "Traceback" not in proc.stderr
