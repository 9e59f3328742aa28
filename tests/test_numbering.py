"""One slice numbering for the user: the numbers of their files, everywhere.

A stack written as a microscope writes it (``slice_0001.tif`` ... numbered from 1) with
labels painted napari-style (0 = not painted) goes through ingest, train, segment,
evaluate and suggest, and every line printed speaks of its files' numbers, never of z.
"""

import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import tensorstore as ts
import tifffile

from fibseg_jax.cli import suggest as suggest_cli
from fibseg_jax.data import ingest, volume
from fibseg_jax.eval import uncertainty

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
UNET = os.path.join(REPO, "experiments", "configs", "unet.py")
SHAPE = (6, 64, 64)
FIRST = 1  # the files are numbered from 1, as microscopes write them
PAINTED = (2, 4, 5)  # the file numbers of the painted slices (z 1, 3, 4)
CLASSES = ("pore", "solid", "bright")


def fibseg(*args, timeout=600):
  """`python -m fibseg_jax.cli ARGS` on CPU, with this tree first on the path."""
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=REPO)
  return subprocess.run(
    [sys.executable, "-m", "fibseg_jax.cli", *args],
    capture_output=True,
    text=True,
    timeout=timeout,
    cwd=REPO,
    env=env,
    check=False,
  )


def _bands(rng, shape):
  """Class of every pixel (three intensity bands along x, wobbling) and the image."""
  _, w = shape
  x = np.arange(w)[None, :] + rng.integers(-2, 3, size=(shape[0], 1))
  classes = np.clip(x * 3 // w, 0, 2).astype(np.uint8)
  image = (classes.astype(np.float32) * 20000 + 5000 + rng.normal(0, 800, shape)).astype(np.uint16)
  return classes, image


def write_microscope_stack(root, painted=PAINTED, share=0.05, seed=0):
  """ICE/slice_0001.tif ... and labels/slice_NNNN.tif painted napari-style: 0 = not
  painted, classes 1..3, on `share` of each painted slice (a few broad strokes)."""
  rng = np.random.default_rng(seed)
  os.makedirs(os.path.join(root, "ICE"), exist_ok=True)
  os.makedirs(os.path.join(root, "labels"), exist_ok=True)
  truth = {}
  for z in range(SHAPE[0]):
    number = FIRST + z
    classes, image = _bands(rng, SHAPE[1:])
    tifffile.imwrite(os.path.join(root, "ICE", f"slice_{number:04d}.tif"), image)
    truth[number] = classes
    if number in painted:
      lab = np.zeros(SHAPE[1:], np.uint8)
      rows = max(1, round(share * SHAPE[1] / 3))  # three strokes across every band
      for start in range(0, SHAPE[1], SHAPE[1] // 3)[:3]:
        lab[start : start + rows] = classes[start : start + rows] + 1
      tifffile.imwrite(os.path.join(root, "labels", f"slice_{number:04d}.tif"), lab)
  return truth


# --- the mapping ---------------------------------------------------------------------------


def test_slice_numbers_map_both_ways_and_name_the_flag():
  numbering = volume.SliceNumbers.of((1, 2, 3, 5, 6), 5)
  assert numbering.labels([0, 3]) == [1, 5] and numbering.to_zs([6, 1], "--slices") == (4, 0)
  assert numbering.describe() == "1..3, 5..6"
  with pytest.raises(volume.VolumeError) as error:
    numbering.to_zs([0, 4], "--config.data.eval_slices=0,4")
  assert str(error.value) == (
    "--config.data.eval_slices=0,4: no slice numbers 0, 4 in this stack; its slices are "
    "numbered 1..3, 5..6 (the numbers of its files, as ingest read them)"
  )
  # Files numbered from 0 (synthetic stacks), or none stored: number = z, nothing changes.
  for numbers in ((0, 1, 2), (), None, (3, 1, 2), (1, 2)):
    same = volume.SliceNumbers.of(numbers, 3)
    assert same.is_identity and same.labels([0, 2]) == [0, 2] and same.describe() == "0..2"


def test_a_volume_without_stored_numbers_keeps_number_z():
  attrs = volume.VolumeMetadata((3, 4, 4), ("ICE",), ("a",), (1, 1, 1)).to_json()
  assert "slice_numbers" not in attrs  # as volumes written before the numbering
  meta = volume.VolumeMetadata.from_json(attrs)
  assert meta.numbering.is_identity and meta.numbering.to_z(2, "--slices") == 2
  meta = volume.VolumeMetadata.from_json({**attrs, "slice_numbers": [11, 12, 13]})
  assert meta.numbering.label(0) == 11 and meta.numbering.to_z(13, "--slices") == 2


# --- painted labels -----------------------------------------------------------------------


def _plan(root, classes=None):
  return ingest.plan_ingest(
    {"ICE": os.path.join(root, "ICE", "*.tif")}, os.path.join(root, "labels", "*.tif"), classes
  )


def test_napari_labels_with_one_class_too_many_are_refused_with_the_flag(tmp_path):
  write_microscope_stack(str(tmp_path))  # values 0..3
  with pytest.raises(ingest.IngestError) as error:
    ingest.ingest(_plan(str(tmp_path), CLASSES), str(tmp_path / "v.zarr"), voxel_size_nm=(1, 1, 1))
  message = str(error.value)
  assert "napari-style labels (0 = not painted, classes 1..3)" in message
  assert message.endswith("pass --labels_unlabelled=0")
  assert "one name per label value" not in message  # never: invent a class for 0


def test_napari_labels_that_happen_to_fit_are_refused_not_read_as_a_class(tmp_path):
  # Four classes named, the painted slices show three: the values fit 0..3.
  write_microscope_stack(str(tmp_path))
  plan = _plan(str(tmp_path), (*CLASSES, "fourth"))
  with pytest.raises(ingest.IngestError) as error:
    ingest.ingest(plan, str(tmp_path / "v.zarr"), voxel_size_nm=(1, 1, 1), progress=False)
  message = str(error.value)
  assert "value 0 covers" in message and "every 0 pixel would train as class 'pore'" in message
  assert "pass --labels_unlabelled=0" in message
  # Without --classes the same: class0 would be "not painted".
  with pytest.raises(ingest.IngestError, match="would train as a class of its own"):
    ingest.ingest(_plan(str(tmp_path)), str(tmp_path / "v.zarr"), voxel_size_nm=(1, 1, 1))
  # Stated either way, it is what the user says.
  meta = ingest.ingest(plan, str(tmp_path / "a.zarr"), voxel_size_nm=(1, 1, 1), unlabelled=255)
  assert meta.classes == (*CLASSES, "fourth")
  meta = ingest.ingest(plan, str(tmp_path / "b.zarr"), voxel_size_nm=(1, 1, 1), unlabelled=0)
  assert volume.open_volume(str(tmp_path / "b.zarr")).read_labels(1).min() == 0


def test_labels_mostly_zero_but_not_surely_painted_warn(tmp_path):
  write_microscope_stack(str(tmp_path), share=0.3)  # 0 on 72% of each painted slice
  warnings = []
  plan = _plan(str(tmp_path), (*CLASSES, "fourth"))
  error, warning = ingest.painted_labels_check(plan, plan.classes)
  assert error is None and warning is not None
  ingest.ingest(plan, str(tmp_path / "v.zarr"), voxel_size_nm=(1, 1, 1), warn=warnings.append)
  assert warnings == [warning] and "--labels_unlabelled=0" in warning
  # Labels that use 255 for "not annotated" are the volume's own convention: no word.
  lab = tifffile.imread(os.path.join(tmp_path, "labels", "slice_0002.tif"))
  lab[:2] = 255
  tifffile.imwrite(os.path.join(tmp_path, "labels", "slice_0002.tif"), lab)
  assert ingest.painted_labels_check(plan, plan.classes) == (None, None)


def test_the_ingest_command_refuses_napari_labels_in_one_line(tmp_path):
  write_microscope_stack(str(tmp_path))
  done = fibseg(
    "ingest",
    f"--channel=ICE={tmp_path}/ICE/*.tif",
    f"--labels={tmp_path}/labels/*.tif",
    f"--classes={','.join(CLASSES)}",
    "--voxel_size_nm=50,10,10",
    f"--out={tmp_path}/v.zarr",
  )
  assert done.returncode == 1 and len(done.stderr.strip().splitlines()) == 1, done.stderr
  assert "pass --labels_unlabelled=0" in done.stderr and "Traceback" not in done.stderr


# --- suggest explains itself ------------------------------------------------------------


def test_explain_choice_names_what_the_spacing_skipped():
  scores = [0.1, 0.9, 0.8, 0.2, 0.05, 0.3]
  annotated = [2]
  ranking = uncertainty.rank_slices(scores, annotated)  # z 1, 5, 3, 0, 4
  chosen = uncertainty.choose_spread(ranking, annotated, 2, 2)
  assert chosen == [5, 0]  # z 1 and 3 are next to the annotated z 2
  why = uncertainty.explain_choice(ranking, annotated, chosen, 2)
  assert why["suggested"] == [{"z": 5, "rank": 2}, {"z": 0, "rank": 4}]
  assert why["skipped"] == [
    {"z": 1, "rank": 1, "near": 2, "distance": 1, "near_annotated": 1},
    {"z": 3, "rank": 3, "near": 2, "distance": 1, "near_annotated": 1},
  ]
  document = {
    "ranking": [{"z": z, "uncertainty": s} for z, s in ranking],
    "suggested": chosen,
    "min_gap": 2,
    "explanation": why,
  }
  lines = suggest_cli.explain(document, volume.SliceNumbers.of(range(1, 7), 6))
  assert lines[1] == "1. slice 6: uncertainty 0.3000, rank 2 of 5"
  assert lines[2].startswith("2. slice 1: uncertainty 0.1000, rank 4 of 5 (among the least")
  assert (
    lines[3] == "   skipped slice 2 (rank 1): 1 from annotated slice 3, closer than --min_gap=2"
  )


# --- segment's mistakes -------------------------------------------------------------------


def test_segment_into_a_missing_folder_names_the_flag_given(tmp_path):
  os.makedirs(tmp_path / "run")
  done = fibseg(
    "segment",
    f"--workdir={tmp_path}/run",
    f"--input={tmp_path}/vol.zarr",
    f"--output={tmp_path}/missing/seg.zarr",
    "--noprogress",
  )
  assert done.returncode == 1
  assert done.stderr.strip() == (
    f"error: --output={tmp_path}/missing/seg.zarr: parent directory {tmp_path}/missing does "
    "not exist; create it first"
  )


# --- the whole path -----------------------------------------------------------------------


def _numbers_in(line):
  return [int(n) for n in re.findall(r"\d+", line)]


def test_a_stack_numbered_from_one_keeps_its_numbers_from_ingest_to_suggest(tmp_path):
  root = str(tmp_path)
  write_microscope_stack(root, share=0.3)
  vol = f"{root}/vol.zarr"
  done = fibseg(
    "ingest",
    f"--channel=ICE={root}/ICE/*.tif",
    f"--labels={root}/labels/*.tif",
    "--labels_unlabelled=0",
    f"--classes={','.join(CLASSES)}",
    "--voxel_size_nm=50,10,10",
    f"--out={vol}",
    "--noprogress",
  )
  assert done.returncode == 0, done.stderr
  assert "6 slices of 64 x 64 (numbered 1..6, as their files)" in done.stdout
  assert "annotated slices [2, 4, 5]" in done.stdout, done.stdout
  assert done.stderr == ""  # --noprogress: no bar

  # 6 is not annotated, 0 is no slice of this stack: both refused in the user's numbers.
  common = [
    "train",
    f"--config={UNET}",
    f"--workdir={root}/run",
    f"--config.data.path={vol}",
    "--config.data.channels=ICE",
    "--config.data.patch=16",
    "--config.data.val_block=16",
    "--config.model.depth=2",
    "--config.model.features=(4,8,8)",
    "--config.train.batch_size=2",
    "--config.train.steps=3",
    "--config.train.eval_every=3",
    "--noprogress",
  ]
  bad = fibseg(*common, "--config.data.eval_slices=6")
  assert bad.returncode == 1
  assert "slice 6 has no labels; annotated slices are 2, 4, 5" in bad.stderr, bad.stderr
  bad = fibseg(*common, "--config.data.eval_slices=0")
  assert "no slice number 0 in this stack; its slices are numbered 1..6" in bad.stderr
  done = fibseg(*common, "--config.data.eval_slices=5")
  assert done.returncode == 0, done.stderr[-3000:]
  assert "training on [2, 4], held out for evaluation [5]" in done.stdout, done.stdout

  seg, unc = f"{root}/seg.zarr", f"{root}/unc.zarr"
  done = fibseg(
    "segment",
    f"--workdir={root}/run",
    f"--input={vol}",
    f"--output={seg}",
    f"--uncertainty={unc}",
    "--tile=32",
    "--overlap=8",
    "--format=none",
    "--noprogress",
  )
  assert done.returncode == 0, done.stderr[-3000:]
  assert done.stderr == ""
  # Only files 4 and 5: z 3 and 4 are segmented, and evaluate does not call it the stack.
  part = f"{root}/part.zarr"
  args = [f"--workdir={root}/run", f"--input={vol}", "--tile=32", "--overlap=8", "--notta"]
  done = fibseg("segment", *args, f"--output={part}", "--slices=4-5", "--format=none")
  assert done.returncode == 0, done.stderr[-3000:]
  labels = volume.open_volume(vol).labels  # for its shape only
  spec = {"driver": "zarr3", "kvstore": {"driver": "file", "path": part}}
  written = ts.open(spec).result().read().result()
  assert [z for z in range(labels.shape[0]) if (written[z] != 255).all()] == [3, 4]
  done = fibseg(
    "evaluate",
    f"--prediction={part}",
    f"--truth={vol}",
    "--slices=5",
    f"--out={root}/report_part",
    "--nostructure",
  )
  assert done.returncode == 0, done.stderr
  assert "whole stack" not in done.stdout and "segmented part (33% of the stack)" in done.stdout
  bad = fibseg("segment", *args, f"--output={root}/x.zarr", "--slices=0")
  assert bad.returncode == 1 and "no slice number 0 in this stack" in bad.stderr, bad.stderr

  report = f"{root}/report"
  done = fibseg(
    "evaluate", f"--prediction={seg}", f"--truth={vol}", "--slices=5", f"--out={report}"
  )
  assert done.returncode == 0, done.stderr
  assert done.stdout.startswith("slices 5: accuracy"), done.stdout
  assert f"figure:  {report}/slice_0005.png" in done.stdout
  assert "whole stack" in done.stdout and "slices 1..6" in done.stdout
  doc = json.load(open(f"{report}/report.json"))
  assert doc["slices"] == [5] and list(doc["per_slice"]) == ["5"]
  assert list(doc["stack"]["per_slice_fractions"]) == ["1", "2", "3", "4", "5", "6"]

  # The painted label files themselves, read as ingest read them.
  glob_report = f"{root}/report_glob"
  truth = f"--truth={root}/labels/*.tif"
  done = fibseg("evaluate", f"--prediction={seg}", truth, f"--out={glob_report}")
  assert done.returncode == 1 and "pass --labels_unlabelled=0" in done.stderr, done.stderr
  done = fibseg(
    "evaluate", f"--prediction={seg}", truth, "--labels_unlabelled=0", f"--out={glob_report}"
  )
  assert done.returncode == 0, done.stderr
  assert done.stdout.startswith("slices 2, 4, 5: accuracy"), done.stdout

  done = fibseg("suggest", f"--uncertainty={unc}", f"--volume={vol}", f"--out={root}/next")
  assert done.returncode == 0, done.stderr
  lines = done.stdout.splitlines()
  suggested = [ln for ln in lines if re.match(r"\d+\. slice ", ln)]
  assert suggested, done.stdout
  for line in suggested:  # "1. slice N: uncertainty U, rank R of 3"
    assert _numbers_in(line.split(":")[0])[1] in (1, 3, 6), line  # the unpainted files
    assert re.search(r"rank \d of 3", line), line
  assert "3 slices without labels ranked by uncertainty" in lines[0]
  doc = json.load(open(f"{root}/next/suggest.json"))
  assert doc["suggested_slices"] == [z + 1 for z in doc["suggested"]]
