"""The recipe ablation (fibseg_jax.study.ablation): its rows, its table, the script end to end."""

import json
import os
import subprocess
import sys

import pytest

from fibseg_jax.study import ablation, budget, runs
from fibseg_jax.train import config as config_lib
from fibseg_jax.train import data_config, metrics_writer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _config(overrides):
  config = runs.network_config(
    budget.get("smoke"),
    architecture="unet",
    channels=("ICE", "TLD"),
    slices=3,
    seed=0,
    volume="vol.zarr",
    held_out=(9,),
  )
  runs.set_fields(config, overrides)
  return config


def test_rows_add_one_part_to_their_reference():
  table = ablation.rows()
  assert list(table)[:4] == ["baseline", "full", "+lr_3x", "full+lr_3x"]
  assert table["full+lr_3x"] == {**table["full"], **ablation.PARTS["lr_3x"]}
  for name, row in table.items():
    if "+" not in name:  # baseline, full
      continue
    ref = table[ablation.reference(name)]
    differ = {k for k in row if row[k] != ref.get(k)}
    part = name.rsplit("+", 1)[1]
    if part in ablation.PARTS and not name.startswith("full"):
      # Exactly that part differs from the row it is compared with.
      assert differ == {k for k, v in ablation.PARTS[part].items() if ref.get(k) != v}, name
  assert ablation.reference("lr_3x+deep_supervision") == "+lr_3x"
  assert ablation.reference("+sgd_poly") == "baseline"
  with pytest.raises(ValueError, match="unknown row.*known: baseline, full"):
    ablation.rows(["baseline", "+nothing"])


def test_parts_name_the_flag_and_the_known_parts():
  assert ablation.parts(["artifacts", "lr_3x"]) == {
    **ablation.PARTS["artifacts"],
    **ablation.PARTS["lr_3x"],
  }
  with pytest.raises(ValueError, match="--recipe: unknown part.*known: .*artifacts"):
    ablation.parts(["artefacts"])


def test_every_override_is_a_config_field_the_loader_reads():
  for name, overrides in ablation.rows().items():
    config = _config(overrides)
    loader = data_config.loader_config(config_lib.parse(config))
    for dotted, value in overrides.items():
      section, field = dotted.split(".")
      assert config[section][field] == value, (name, dotted)
      if section == "data":
        assert getattr(loader, field) == value, (name, dotted)
  with pytest.raises(KeyError, match="data.no_such"):
    _config({"data.no_such": 1})


def test_markdown_reports_spread_and_paired_difference():
  baseline = [
    {"seed": s, "mean_iou": v, "per_class_iou": {"a": v}, "train_seconds": 1.0}
    for s, v in enumerate((0.5, 0.6, 0.7))
  ]
  better = [
    dict(r, mean_iou=r["mean_iou"] + d) for r, d in zip(baseline, (0.1, 0.0, 0.05), strict=True)
  ]
  rows = [
    ablation.summarise("baseline", baseline, baseline, ["a"]),
    ablation.summarise("+x", better, baseline, ["a"]),
  ]
  assert rows[1]["paired_values"] == pytest.approx([0.1, 0.0, 0.05])
  text = ablation.markdown(
    {
      "volume": "v",
      "classes": ["a"],
      "channels": ["ICE"],
      "slices": 3,
      "train_slices": [1],
      "eval_slices": [2],
      "seeds": [0, 1, 2],
      "budget": {"name": "quick", "steps": 300, "batch_size": 8, "patch": 128},
      "rows": rows,
    }
  )
  assert "| +x | 0.650 +- 0.087 | 0.050 +- 0.050 (baseline) |" in text


def _ablation(*flags):
  return subprocess.run(
    [sys.executable, os.path.join(REPO, "experiments", "ablation.py"), *flags],
    capture_output=True,
    text=True,
    env=dict(os.environ, JAX_PLATFORMS="cpu"),
  )


def test_ablation_script_trains_scores_pairs_and_resumes(tmp_path):
  """Two rows, two seeds on the smoke budget: the table, the paired difference of the
  same seeds, a rerun that trains nothing, and another step budget refused."""
  out = str(tmp_path / "ablation")
  flags = ["--out=" + out, "--budget=smoke", "--rows=baseline,+lr_3x", "--seeds=0,1"]
  first = _ablation(*flags)
  assert first.returncode == 0, first.stderr[-3000:]
  document = json.load(open(os.path.join(out, "ablation.json")))
  baseline, lr = document["rows"]
  assert (baseline["name"], lr["name"]) == ("baseline", "+lr_3x")
  assert baseline["seeds"] == lr["seeds"] == [0, 1]
  assert all(0 <= v <= 1 for v in baseline["values"] + lr["values"])
  paired = [b - a for a, b in zip(baseline["values"], lr["values"], strict=True)]
  assert lr["paired_values"] == pytest.approx(paired)
  assert lr["reference"] == "baseline" and baseline["paired_difference"]["mean"] == 0
  # Each run trained what its row says: the learning rate reached the saved config.
  for name, rate in (("baseline", 1e-3), ("lr_3x", 3e-3)):
    saved = metrics_writer.saved_config(os.path.join(out, f"{name}_s1", "run"))
    assert saved["train"]["learning_rate"] == pytest.approx(rate)
  table = open(os.path.join(out, "ablation.md")).read()
  assert "| +lr_3x | " in table and " (baseline) |" in table
  # A rerun reuses every finished run.
  result = os.path.join(out, "lr_3x_s0", "result.json")
  before = os.path.getmtime(result)
  again = _ablation(*flags)
  assert again.returncode == 0, again.stderr[-3000:]
  assert os.path.getmtime(result) == before
  assert json.load(open(os.path.join(out, "ablation.json")))["rows"] == document["rows"]
  # Another step budget in the same --out is refused in one line, naming the flag.
  other = _ablation(*flags, "--steps=7")
  assert other.returncode != 0
  assert "Traceback" not in other.stderr
  assert "--out" in other.stderr.strip().splitlines()[-1]
  # Another budget in its own --out, then both side by side against the step budget.
  longer = str(tmp_path / "longer")
  steps = document["budget"]["steps"] * 2
  run = _ablation(
    f"--out={longer}",
    f"--volume={document['volume']}",  # the first one's stack
    "--train_slices=" + ",".join(map(str, document["train_slices"])),
    "--eval_slices=" + ",".join(map(str, document["eval_slices"])),
    "--budget=smoke",
    "--rows=+lr_3x",
    "--seeds=0",
    f"--steps={steps}",
  )
  assert run.returncode == 0, run.stderr[-3000:]
  both = str(tmp_path / "budgets")
  compared = _ablation(f"--out={both}", f"--compare={out},{longer}/ablation.json")
  assert compared.returncode == 0, compared.stderr[-3000:]
  budgets = json.load(open(os.path.join(both, "budgets.json")))
  assert budgets["steps"] == [document["budget"]["steps"], steps]
  assert [p["steps"] for p in budgets["rows"]["+lr_3x"]] == budgets["steps"]
  assert [p["steps"] for p in budgets["rows"]["baseline"]] == budgets["steps"][:1]
  assert budgets["rows"]["+lr_3x"][0]["mean_iou"] == lr["mean_iou"]
  assert os.path.getsize(os.path.join(both, "budgets.png")) > 0
  assert f"| +lr_3x | {steps} | 1 |" in open(os.path.join(both, "budgets.md")).read()
  only = _ablation(f"--out={both}", f"--compare={out},{longer}", "--rows=+lr_3x")
  assert only.returncode == 0, only.stderr[-3000:]
  assert list(json.load(open(os.path.join(both, "budgets.json")))["rows"]) == ["+lr_3x"]
  # --out is this command's own folder: not a compared ablation, nor someone else's.
  inside = _ablation(f"--out={out}", f"--compare={out},{longer}")
  assert inside.returncode != 0 and "Traceback" not in inside.stderr
  assert "--out=" in inside.stderr and os.path.exists(os.path.join(out, "ablation.md"))
  assert not os.path.exists(os.path.join(out, "budgets.md"))
  # Ablations of one budget, or of another stack, are refused in one line.
  same = _ablation(f"--out={both}", f"--compare={out},{out}")
  assert same.returncode != 0 and "two ablations of the same step budget" in same.stderr
  missing = _ablation(f"--out={both}", f"--compare={tmp_path / 'nothing'}")
  assert missing.returncode != 0 and "nothing/ablation.json is not a finished" in missing.stderr
