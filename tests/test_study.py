"""study.py and sweep.py end to end on the smoke budget; scoring, budgets and user mistakes."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from fibseg_jax import models, study
from fibseg_jax.data import synth, volume
from fibseg_jax.study import ablation, comparison, runs
from fibseg_jax.train import metrics_writer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLASSES = list(synth.CLASSES)
ROW_FIELDS = (
  "name",
  "architecture",
  "channels",
  "slices",
  "inputs",
  "params",
  "seeds",
  "train_seconds",
  "mean_iou",
  "per_class_iou",
  "fraction_error",
  "runs",
)


@pytest.fixture(scope="module")
def compile_cache(tmp_path_factory):
  """One JAX compilation cache for both scripts: the sweep's network is a study row."""
  return str(tmp_path_factory.mktemp("jax_cache"))


def _run(script, *flags, cache):
  env = dict(os.environ, JAX_PLATFORMS="cpu", JAX_COMPILATION_CACHE_DIR=cache)
  return subprocess.run(
    [sys.executable, os.path.join(REPO, "experiments", script), *flags],
    cwd=REPO,
    env=env,
    capture_output=True,
    text=True,
    check=False,
  )


@pytest.fixture(scope="module")
def smoke_study(tmp_path_factory, compile_cache):
  out = tmp_path_factory.mktemp("study") / "out"
  done = _run("study.py", f"--out={out}", "--budget=smoke", cache=compile_cache)
  assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
  return out, done.stdout


def test_study_writes_every_row_and_field(smoke_study):
  out, stdout = smoke_study
  doc = json.loads((out / "study.json").read_text())
  names = [r["name"] for r in doc["rows"]]
  networks = [f"{a}_{s}_{c}" for a, s in comparison.NETWORKS for c in ("ice", "tld", "ice_tld")]
  raw = [r for r in doc["rows"] if r["kind"] == "network" and r["inputs"] == "raw"]
  best = max(raw, key=lambda r: r["mean_iou"]["mean"])["name"]
  assert names == [*networks, f"{best}_cleaned", "otsu", "clean_otsu", "forest"]
  # One progress line per row.
  assert sum(line.startswith("[") for line in stdout.splitlines()) == len(names)
  for row in doc["rows"]:
    assert set(ROW_FIELDS) <= set(row), row["name"]
    assert set(row["per_class_iou"]) == set(row["fraction_error"]) == set(CLASSES)
    assert 0 <= row["mean_iou"]["mean"] <= 1 and row["train_seconds"] >= 0
    assert row["params"] > 0 and len(row["runs"]) == len(row["seeds"])
    # Predicted and true fractions both sum to 1 over the phases.
    assert abs(sum(row["fraction_error"].values())) < 1e-9
    if len(row["seeds"]) == 1:
      assert row["mean_iou"]["std"] is None
      ious = [v for v in row["per_class_iou"].values() if v is not None]
      assert row["mean_iou"]["mean"] == pytest.approx(np.mean(ious))
  by_name = {r["name"]: r for r in doc["rows"]}
  for name in study.SMOKE.spread_rows:
    row = by_name[name]
    assert row["seeds"] == list(study.SMOKE.spread_seeds)
    values = [r["mean_iou"] for r in row["runs"]]
    assert row["mean_iou"]["std"] == pytest.approx(np.std(values, ddof=1))
  assert by_name[f"{best}_cleaned"]["inputs"] == "cleaned"
  assert volume.open_volume(str(out / "cleaned.zarr")).metadata.dtype == "float32"
  # Sensor-3D and the U-Net differ in parameters; channels add input weights.
  assert by_name["unet_1_ice_tld"]["params"] > by_name["unet_1_ice"]["params"]
  table = (out / "study.md").read_text()
  assert sum(line.startswith("| ") for line in table.splitlines()) == len(names) + 1
  assert (out / "study.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_study_resumes_without_recomputing(smoke_study, compile_cache):
  out, _ = smoke_study
  result = out / "rows" / "forest" / "seed_0" / runs.RESULT
  before = result.stat().st_mtime_ns
  # --rows picks what may run; rows finished earlier stay in the table.
  again = _run("study.py", f"--out={out}", "--budget=smoke", "--rows=forest", cache=compile_cache)
  assert again.returncode == 0, again.stderr[-3000:]
  lines = [line for line in again.stdout.splitlines() if line.startswith("[")]
  assert len(lines) == 13 and all("finished earlier" in line for line in lines)
  assert result.stat().st_mtime_ns == before
  assert len(json.loads((out / "study.json").read_text())["rows"]) == 13
  # Another budget in the same directory is refused before anything runs.
  other = _run("study.py", f"--out={out}", "--budget=quick", cache=compile_cache)
  assert other.returncode == 1
  assert "holds results of other settings" in other.stderr and "budget.name" in other.stderr


def test_sweep_writes_every_curve(tmp_path, smoke_study, compile_cache):
  study_out, _ = smoke_study
  out = tmp_path / "sweep"
  done = _run(
    "sweep.py",
    f"--out={out}",
    "--budget=smoke",
    f"--best_from={study_out / 'study.json'}",
    "--recipe=artifacts",
    cache=compile_cache,
  )
  assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
  doc = json.loads((out / "sweep.json").read_text())
  # The network trained with the recipe part asked for; the routes are as ever.
  assert doc["network"]["recipe"] == ["artifacts"]
  saved = metrics_writer.saved_config(
    str(out / "points" / "default" / "network" / "seed_0" / "run")
  )
  for dotted, value in ablation.PARTS["artifacts"].items():
    section, field = dotted.split(".")
    assert saved[section][field] == value
  rows = json.loads((study_out / "study.json").read_text())["rows"]
  raw = [r for r in rows if r["kind"] == "network" and r["inputs"] == "raw"]
  best = max(raw, key=lambda r: r["mean_iou"]["mean"])
  assert doc["network"]["architecture"] == best["architecture"]
  assert doc["network"]["slices"] == best["slices"] and best["name"] in doc["network"]["source"]
  # Default stack plus each artifact switched off: 4 stacks, one progress line each.
  assert sum(line.startswith("[") for line in done.stdout.splitlines()) == 4
  assert set(doc["artifacts"]) == set(study.ARTIFACTS)
  at_default = []
  for curves in doc["artifacts"].values():
    assert set(curves) == set(study.METHODS)
    for points in curves.values():
      assert [p["severity"] for p in points] == [0.0, 1.0]
      assert all(0 <= p["mean_iou"]["mean"] <= 1 for p in points)
      assert set(points[0]["per_class_iou"]) == set(CLASSES)
    at_default.append({m: pts[1]["mean_iou"]["mean"] for m, pts in curves.items()})
  # The three curves share the all-default stack, hence its numbers.
  assert at_default[0] == at_default[1] == at_default[2]
  assert (out / "sweep.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_score_matches_hand_counts():
  truth = np.array([[0, 0, 1, 1], [2, 2, 255, 255]], np.uint8)
  pred = np.array([[0, 1, 1, 1], [2, 0, 3, 3]], np.uint8)
  s = runs.score({4: truth}, {4: pred}, ["a", "b", "c", "d"])
  # a: tp 1, fp 1, fn 1 -> 1/3; b: 2/3; c: 1/2; d absent everywhere annotated -> None.
  assert s["per_class_iou"] == pytest.approx({"a": 1 / 3, "b": 2 / 3, "c": 1 / 2, "d": None})
  assert s["mean_iou"] == pytest.approx((1 / 3 + 2 / 3 + 1 / 2) / 3)
  assert s["fraction_error"]["c"] == pytest.approx(1 / 6 - 2 / 6)
  assert s["accuracy"] == pytest.approx(4 / 6)


@pytest.mark.parametrize("name", sorted(study.BUDGETS))
def test_budgets_fit_their_models_and_stack(name):
  b = study.get_budget(name)
  z, y, x = b.shape
  assert set(b.train_slices).isdisjoint(b.eval_slices)
  assert all(0 <= s < z for s in (*b.train_slices, *b.eval_slices))
  assert b.patch <= min(y, x) and b.tile >= b.patch and b.steps >= b.eval_every
  for architecture in ("unet", "sensor3d"):
    config = {**models.default_config(architecture), **b.model(architecture)}
    for slices in (1, 3):
      models.check_input_shape(config, slices, b.patch, b.patch)
    assert b.tile % models.size_multiple(config) == 0
  assert json.loads(json.dumps(b.to_json())) == b.to_json()


def test_user_mistakes_name_the_flag(tmp_path):
  stack = synth.generate(synth.SynthConfig(shape=(6, 32, 32)))
  synth.write_volume(stack, "memory://study_flags", (1, 3, 4), overwrite=True)
  vol = volume.open_volume("memory://study_flags")
  with pytest.raises(study.StudyError, match=r"--train_slices: slice\(s\) \[2\] have no labels"):
    comparison.setup(vol, (1, 2), (4,))
  with pytest.raises(study.StudyError, match="share slice"):
    comparison.setup(vol, (1, 3), (3, 4))
  setup = comparison.setup(vol, None, (4,))
  assert setup.train_slices == (1, 3) and setup.held_out == (4,)
  with pytest.raises(study.StudyError, match="--eval_slices is required"):
    study.run_study(str(tmp_path / "a"), study.SMOKE, volume="memory://study_flags")
  with pytest.raises(study.StudyError, match="apply to a --volume"):
    study.run_study(str(tmp_path / "b"), study.SMOKE, eval_slices=(4,))
  with pytest.raises(ValueError, match="--budget=fast: expected one of"):
    study.get_budget("fast")
  one = [r.name for r in study.plan_rows(study.SMOKE, ("ICE",))]
  assert one == ["unet_1_ice", "unet_3_ice", "sensor3d_3_ice", "otsu", "clean_otsu", "forest"]


def test_semi_study_writes_the_four_rows_and_the_slice_test(tmp_path, compile_cache):
  out = tmp_path / "semi"
  flags = (f"--out={out}", "--budget=smoke", "--seeds=0,1", "--suggest")
  done = _run("semi_study.py", *flags, cache=compile_cache)
  assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
  doc = json.loads((out / "fourway.json").read_text())
  assert [r["name"] for r in doc["rows"]] == ["supervised", "+ semi", "+ TTA", "+ both"]
  assert set(doc["ensembles"]) == {"supervised", "semi"}
  for ensemble in doc["ensembles"].values():
    assert set(ensemble) == {"plain", "tta"} and 0 <= ensemble["tta"]["mean_iou"] <= 1
  for row in doc["rows"]:
    assert 0 <= row["mean_iou"]["mean"] <= 1 and set(row["per_class"]) == set(CLASSES)
  table = (out / "fourway.md").read_text()
  assert "| + both |" in table and "| + semi + TTA, ensemble of the 2 seeds |" in table
  semi_log = (out / "semi_s0" / "train.log").read_text()
  assert "starting from scratch" in semi_log
  ranked = json.loads((out / "ranking" / "ranking.json").read_text())  # the ranking study's
  annotated = {*doc["train_slices"], *doc["eval_slices"]}
  assert ranked["seeds"] == [0, 1] and ranked["train_slices"] == doc["train_slices"]
  for pick in ("disagreement", "entropy", "random"):
    assert not set(ranked["rows"][pick]["slices"]) & annotated
  assert not set(ranked["rows"]["random"]["slices"]) & set(ranked["rows"]["disagreement"]["slices"])
  assert "| + a random slice |" in (out / "ranking" / "ranking.md").read_text()
  other = _run("semi_study.py", *flags, "--semi_threshold=0.5", cache=compile_cache)
  assert other.returncode != 0 and "holds a result computed with other semi" in other.stderr
  finished = (out / "semi_s0" / "result.json").stat().st_mtime_ns
  again = _run("semi_study.py", *flags, cache=compile_cache)  # resumes: nothing is redone
  assert again.returncode == 0, again.stderr[-3000:]
  assert (out / "semi_s0" / "result.json").stat().st_mtime_ns == finished


def test_a_budget_file_of_ones_own(tmp_path):
  path = tmp_path / "mine.py"
  path.write_text(
    "from fibseg_jax.configs.budgets import smoke\n\n"
    "def get_config():\n"
    "  config = smoke.get_config()\n"
    "  config.name = 'mine'\n"
    "  config.steps = 4\n"
    "  config.forest.n_estimators = 3\n"
    "  return config\n"
  )
  b = study.get_budget(str(path))
  assert (b.name, b.steps, b.forest.n_estimators) == ("mine", 4, 3)
  assert b.cleaning == study.SMOKE.cleaning and b.shape == study.SMOKE.shape
  path.write_text("def get_config():\n  return {'name': 'x', 'stepz': 1}\n")
  with pytest.raises(ValueError, match=r"unknown field\(s\) \['stepz'\]"):
    study.get_budget(str(path))
