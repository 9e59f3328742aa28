"""`fibseg study NAME`: one runner for every study, over one stack or a suite of them."""

import ast
import glob
import json
import os
import subprocess
import sys

import pytest

from fibseg_jax import outputs
from fibseg_jax.study import ablation, distill, effort, prior, ranking, runs, semi, suite
from fibseg_jax.study import budget as budget_lib
from fibseg_jax.train import metrics_writer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(REPO, "experiments", "results")
# Each committed table and the function that writes it from its JSON.
TABLES = {
  "ablation_*.json": ablation.markdown,
  "budgets_*.json": ablation.budgets_markdown,
  "fourway_*.json": semi.fourway_markdown,
  "distill_*.json": distill.markdown,
  "effort_*.json": effort.markdown,
  "ranking_*.json": ranking.markdown,
  "prior.json": prior.markdown,
}


def fibseg(*args, env=None):
  return subprocess.run(
    [sys.executable, "-m", "fibseg_jax.cli", *args],
    cwd=REPO,
    capture_output=True,
    text=True,
    timeout=900,
    env=dict(os.environ, JAX_PLATFORMS="cpu", **(env or {})),
  )


@pytest.mark.parametrize("pattern", list(TABLES))
def test_committed_tables_regenerate_byte_identically(pattern):
  files = sorted(glob.glob(os.path.join(RESULTS, pattern)))
  assert files, pattern
  for path in files:
    with open(path) as f:
      document = json.load(f)
    with open(path[: -len(".json")] + ".md") as f:
      assert TABLES[pattern](document) == f.read(), path


def test_a_budget_without_overrides_reads_as_before():
  smoke = budget_lib.SMOKE
  assert "overrides" not in smoke.to_json()  # the cached cells of earlier studies stay valid
  changed = smoke.__class__(**{**smoke.__dict__, "overrides": (("train.learning_rate", 0.01),)})
  assert changed.to_json()["overrides"] == {"train.learning_rate": 0.01}


def test_overrides_set_nested_and_tuple_fields():
  config = runs.network_config(
    budget_lib.SMOKE.__class__(
      **{
        **budget_lib.SMOKE.__dict__,
        "overrides": (("data.channels", "ICE"), ("model.features", (4, 4, 8, 8, 16, 4))),
      }
    ),
    architecture="unet",
    channels=("ICE", "TLD"),
    slices=3,
    seed=0,
    volume="vol.zarr",
    held_out=(9,),
  )
  assert config.data.channels == ("ICE",) and config.model.features == (4, 4, 8, 8, 16, 4)
  with pytest.raises(KeyError, match="train.nope"):
    runs.set_fields(config, {"train.nope": 1})


def test_stack_names_are_checked():
  assert [s.name for s in suite.resolve("suite")] == [s.name for s in suite.STACKS]
  assert [s.name for s in suite.resolve("synthetic_drift,synthetic")] == [
    "synthetic_drift",
    "synthetic",
  ]
  with pytest.raises(ValueError, match=r"--stacks=synthetc: unknown stack\(s\) \['synthetc'\]"):
    suite.resolve("synthetc")


@pytest.mark.parametrize(
  ("arg", "message"),
  [
    ("--config.train.learning_rat=1", "did you mean --config.train.learning_rate?"),
    ("--config.train.steps=abc", "--config.train.steps=abc: expected an integer"),
    ("--config=unet", "a study trains the shipped configs"),
  ],
)
def test_config_mistakes_are_one_line(arg, message):
  done = fibseg("study", "ablation", "--out=never", arg)
  assert done.returncode == 2 and done.stderr.count("\n") == 1, done.stderr
  assert message in done.stderr and not os.path.exists(os.path.join(REPO, "never"))


def test_a_study_over_two_stacks_resumes_with_the_overrides_in_every_cell(tmp_path):
  """The old command name runs the study over two generated stacks with a config field
  set for every cell; `fibseg study ablation` resumes it without retraining; the same
  folder without the field is refused; a missing real stack is one skipped line."""
  out = str(tmp_path / "suite")
  common = [
    f"--out={out}",
    "--budget=smoke",
    "--stacks=synthetic,synthetic_drift,drosophila_vnc",
    f"--stacks_root={tmp_path / 'no_stacks'}",
    "--rows=baseline,+lr_3x",
    "--seeds=0",
  ]
  first = fibseg("ablation", *common, "--config.data.gain=0.25", "--config.train.eval_every=1")
  assert first.returncode == 0, first.stderr[-3000:]
  skipped = [line for line in first.stdout.splitlines() if line.startswith("skipped")]
  assert len(skipped) == 1 and "drosophila_vnc" in skipped[0] and "real_stack.sh" in skipped[0]
  cells = sorted(glob.glob(os.path.join(out, "*", "*_s0", "result.json")))
  assert [os.path.relpath(c, out).split(os.sep)[:2] for c in cells] == [
    ["synthetic", "baseline_s0"],
    ["synthetic", "lr_3x_s0"],
    ["synthetic_drift", "baseline_s0"],
    ["synthetic_drift", "lr_3x_s0"],
  ]
  for cell in cells:  # the overrides reached every cell, under each row's own fields
    saved = metrics_writer.saved_config(os.path.join(os.path.dirname(cell), "run"))
    assert saved["data"]["gain"] == pytest.approx(0.25)
    assert saved["train"]["eval_every"] == 1
    rate = 3e-3 if "lr_3x" in cell else 1e-3
    assert saved["train"]["learning_rate"] == pytest.approx(rate)
  document = json.load(open(os.path.join(out, "suite.json")))
  assert document["stacks"] == ["synthetic", "synthetic_drift"]
  assert document["skipped"] == ["drosophila_vnc"]
  lr = {r["name"]: r for r in document["rows"]}["+lr_3x"]
  per_stack = [lr["stacks"][s]["paired_difference"]["mean"] for s in document["stacks"]]
  assert lr["paired_difference"]["mean"] == pytest.approx(sum(per_stack) / 2)
  assert "| +lr_3x |" in open(os.path.join(out, "suite.md")).read()

  before = {c: os.path.getmtime(c) for c in cells}
  again = fibseg(
    "study", "ablation", *common, "--config.data.gain=0.25", "--config.train.eval_every=1"
  )
  assert again.returncode == 0, again.stderr[-3000:]
  assert {c: os.path.getmtime(c) for c in cells} == before  # nothing retrained
  assert json.load(open(os.path.join(out, "suite.json")))["rows"] == document["rows"]

  other = fibseg("study", "ablation", *common)  # without the overrides: another setting
  assert other.returncode == 1 and "Traceback" not in other.stderr
  assert "computed with other budget" in other.stderr.strip().splitlines()[-1]


def test_prior_study_over_a_suite_resumes_a_folder_without_markers(tmp_path):
  """`fibseg study prior --stacks=...`: cells in OUT/<stack>/, one table of every stack's
  rows in OUT/prior.json; the folder of the first script (no markers) resumes from its
  cells and rewrites the same table."""
  out = tmp_path / "prior"
  args = [f"--out={out}", "--budget=smoke", "--stacks=synthetic", "--levels=slices:1", "--seeds=0"]
  first = fibseg("study", "prior", *args)
  assert first.returncode == 0, first.stderr[-3000:]
  document = json.loads((out / "prior.json").read_text())
  assert [(r["stack"], r["level"], r["seeds"]) for r in document["rows"]] == [
    ("synthetic", "slices:1", [0])
  ]
  assert document["prior"] and not (out / "suite.json").exists()
  cell = out / "synthetic" / "slices_1_s0" / "result.json"
  before, table = cell.stat().st_mtime, (out / "prior.json").read_bytes()
  for marker in out.rglob(outputs.MARKER):  # as experiments/prior_study.py left it
    marker.unlink()
  (out / "prior.json").write_text(json.dumps({"prior": document["prior"], "rows": []}))
  again = fibseg("study", "prior", *args)
  assert again.returncode == 0, again.stderr[-3000:]
  assert cell.stat().st_mtime == before  # nothing refitted
  assert (out / "prior.json").read_bytes() == table


def test_peer_rows_are_one_skipped_line_without_torch(tmp_path):
  """With torch hidden (as on a machine without it), the study skips its MONAI row in
  one line and the benchmark's peer is unavailable with the reason."""
  code = f"""
import importlib.abc, sys

class Hidden(importlib.abc.MetaPathFinder):  # import torch (or monai) raises ImportError
  def find_spec(self, name, path, target=None):
    if name.split(".")[0] in ("torch", "monai"):
      raise ImportError(f"No module named {{name!r}} (hidden)")

sys.meta_path.insert(0, Hidden())
from fibseg_jax import bench
from fibseg_jax.study import budget, comparison, peers
lines = []
doc = comparison.run_study({str(tmp_path / "study")!r}, budget.SMOKE, rows=["otsu", "monai_*"],
                           log=lines.append)
print([line for line in lines if "skipped" in line])
print([r["name"] for r in doc["rows"]])
print(bench.peer.load_peer(bench.make_options(quick=True, peer="monai")).note)
"""
  done = subprocess.run(
    [sys.executable, "-c", code],
    cwd=REPO,
    capture_output=True,
    text=True,
    timeout=600,
    env=dict(os.environ, JAX_PLATFORMS="cpu"),
  )
  assert done.returncode == 0, done.stderr[-3000:]
  skipped, names, note = done.stdout.strip().splitlines()[-3:]
  skipped = ast.literal_eval(skipped)
  assert len(skipped) == 1 and skipped[0].startswith(
    "monai_basicunet: skipped, cannot import torch"
  )
  assert names == "['otsu']"
  assert note.startswith("--peer=monai: cannot import the peer") and "torch" in note


# The commit where the U-Net's learning rate became 3e-3 (it is 1e-3 again since the suite
# decided it): an earlier release whose defaults differ from today's.
EARLIER = "4c43406"


def _has_commit(commit):
  done = subprocess.run(
    ["git", "-C", REPO, "cat-file", "-e", f"{commit}^{{commit}}"], capture_output=True
  )
  return done.returncode == 0


def test_regression_row_refuses_an_unknown_commit(tmp_path):
  done = fibseg("study", "regression", f"--out={tmp_path / 'r'}", "--against=no-such-tag")
  assert done.returncode == 1 and done.stderr.startswith("error: --against=no-such-tag: not a")
  assert done.stderr.count("\n") == 1


@pytest.mark.skipif(not _has_commit(EARLIER), reason=f"a clone without {EARLIER} (shallow)")
def test_regression_row_on_a_tiny_suite(tmp_path):
  """Today's defaults against the earlier release's on a suite of one generated stack:
  the earlier learning rate is found and trained with; the paired difference is there."""
  out = str(tmp_path / "regression")
  done = fibseg(
    "study",
    "regression",
    f"--out={out}",
    "--budget=smoke",
    "--seeds=0",
    "--stacks=synthetic",
    f"--against={EARLIER}",
  )
  assert done.returncode == 0, done.stderr[-3000:]
  one = json.load(open(os.path.join(out, "synthetic", "regression.json")))
  assert one["changed"] == {"train.learning_rate": {"previous": 3e-3, "release": 1e-3}}
  for name, rate in (("previous", 3e-3), ("release", 1e-3)):
    saved = metrics_writer.saved_config(os.path.join(out, "synthetic", f"{name}_s0", "run"))
    assert saved["train"]["learning_rate"] == pytest.approx(rate)
  previous, release = one["rows"]
  assert release["paired_difference"]["mean"] == pytest.approx(
    release["values"][0] - previous["values"][0]
  )
  document = json.load(open(os.path.join(out, "suite.json")))
  row = {r["name"]: r for r in document["rows"]}["release"]
  assert row["paired_difference"]["mean"] == pytest.approx(release["paired_difference"]["mean"])
  assert (
    "train.learning_rate 0.003 -> 0.001"
    in open(os.path.join(out, "synthetic", "regression.md")).read()
  )
