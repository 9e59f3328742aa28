"""`make demo`'s script, end to end on a tiny generated stack (the same script, smaller sizes)."""

import json
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_demo_runs_end_to_end(tmp_path):
  out = tmp_path / "demo"
  env = dict(os.environ)
  env.update(
    PYTHON=sys.executable,
    DEMO_SHAPE="6,64,64",
    DEMO_ANNOTATE="1,2,3,4",
    DEMO_EVAL_SLICE="4",
    DEMO_STEPS="2",
    DEMO_PATCH="32",
    DEMO_BATCH="2",
    DEMO_TILE="64",
    DEMO_OVERLAP="16",
    DEMO_TRAIN_FLAGS="--config.model.depth=2 --config.model.features=(4,8,8) "
    "--config.data.val_block=32 --progress=false",
  )
  done = subprocess.run(
    ["bash", "experiments/demo.sh", str(out)],
    cwd=REPO,
    env=env,
    capture_output=True,
    text=True,
    check=False,
  )
  assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
  assert "demo finished" in done.stdout
  for path in (
    "raw/preview.png",
    "vol.zarr/zarr.json",
    "run/metrics.jsonl",
    "run/training_curves.png",
    "seg.zarr/zarr.json",
    "probs.zarr/zarr.json",
    "unc.zarr/zarr.json",
    "suggest/suggest.json",
    "suggest/uncertainty_z.png",
    "seg.ome.zarr/zarr.json",
    "vol.zarr/ome/zarr.json",
    "report/report.md",
    "report/report.json",
    "report/structure.png",
  ):
    assert (out / path).exists(), path
  report = json.loads((out / "report" / "report.json").read_text())
  assert isinstance(report, dict) and report
  assert report["structure"]["voxel_size_nm"] == [50, 25, 25]
  assert f"{out}/seg.ome.zarr: valid OME-Zarr 0.5 ImageLabel" in done.stdout
  assert f"{out}/vol.zarr/ome: valid OME-Zarr 0.5 Image" in done.stdout


def test_demo_replaces_only_an_earlier_demo(tmp_path):
  mine = tmp_path / "mine"
  mine.mkdir()
  (mine / "notes.txt").write_text("keep")
  done = subprocess.run(
    ["bash", "experiments/demo.sh", str(mine)], cwd=REPO, capture_output=True, text=True
  )
  assert done.returncode == 1
  assert done.stderr.strip() == f"error: {mine} exists and is not an earlier demo's output; " + (
    "choose another folder"
  )
  assert os.listdir(mine) == ["notes.txt"]
