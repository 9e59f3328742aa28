"""The napari widget's actions without Qt (fibseg_jax.napari.session) and the crash-safe
label write they rely on (volume.write_labels, annotations.save_painted)."""

import dataclasses
import os
import subprocess
import sys
import threading

import numpy as np
import pytest
from test_train import CLASSES, make_volume

from fibseg_jax import checkpoint
from fibseg_jax.data import annotations
from fibseg_jax.data import volume as volume_lib
from fibseg_jax.napari import session as session_lib
from fibseg_jax.train import metrics_writer

# A tiny U-Net (2 poolings, patch 16) that trains in seconds.
TINY = (
  "model.depth=2 model.features=(4,8,8) model.norm=batch data.patch=16 data.val_block=16 "
  "data.prefetch=1 train.batch_size=4"
)


def test_painted_round_trip_and_crash_safe_order(tmp_path, monkeypatch):
  root = make_volume(str(tmp_path / "vol.zarr"))
  vol = volume_lib.open_volume(root)
  painted = annotations.painted_from_volume(vol)
  assert painted.dtype == np.uint8 and painted.shape == vol.shape
  assert np.array_equal(painted[1], vol.read_labels(1) + 1)  # class i painted as i + 1
  assert not painted[0].any()

  # Strokes on a new slice; slice 3 wiped; slice 1 untouched.
  painted[2, 5:9, 5:20] = 3
  painted[3] = 0
  changed = annotations.save_painted(root, painted)
  assert changed == [2, 3]
  vol = volume_lib.open_volume(root)
  assert vol.metadata.annotated_slices == (1, 2, 4)
  labels = vol.read_labels(2)
  assert (labels[5:9, 5:20] == 2).all() and (labels == 2).sum() == 4 * 15
  assert (labels[labels != 2] == 255).all()
  assert (vol.read_labels(3) == 255).all()
  # The OME view's annotations follow (viewer values: class + 1).
  view = volume_lib.ts.open(
    {
      "driver": "zarr3",
      "kvstore": "file://" + os.path.join(root, "ome", "labels", "annotations", "0"),
    }
  ).result()
  assert np.array_equal(view[2].read().result(), painted[2])
  assert not view[3].read().result().any()
  # Nothing changed: nothing written.
  assert annotations.save_painted(root, painted) == []

  # A crash while the slices are written leaves them unlisted, never half-listed.
  painted[1, :4, :4] = 1
  real_write = volume_lib.ome.rewrite_label_slice

  def crash(*args, **kwargs):
    raise OSError("disk gone")

  monkeypatch.setattr(volume_lib.ome, "rewrite_label_slice", crash)
  with pytest.raises(OSError):
    annotations.save_painted(root, painted)
  assert 1 not in volume_lib.open_volume(root).metadata.annotated_slices
  monkeypatch.setattr(volume_lib.ome, "rewrite_label_slice", real_write)
  assert annotations.save_painted(root, painted) == [1]
  assert volume_lib.open_volume(root).metadata.annotated_slices == (1, 2, 4)


def test_painted_values_are_checked(tmp_path):
  root = make_volume(str(tmp_path / "vol.zarr"))
  painted = annotations.painted_from_volume(volume_lib.open_volume(root))
  painted[0, 0, 0] = len(CLASSES) + 1
  with pytest.raises(volume_lib.VolumeError, match=r"slice 0: label value 4 is painted.*3 classes"):
    annotations.save_painted(root, painted)
  with pytest.raises(volume_lib.VolumeError, match=r"painted labels are \[2, 48, 48\]"):
    annotations.save_painted(root, painted[:2])


def test_choices_are_checked(tmp_path):
  session = session_lib.Session(make_volume(str(tmp_path / "vol.zarr")))
  assert session.runs == str(tmp_path / "vol.runs")
  with pytest.raises(session_lib.SessionError, match="Model: 'vnet'; expected one of"):
    session.config(session_lib.TrainChoice(model="vnet"))
  with pytest.raises(session_lib.SessionError, match="Slices: 2; expected an odd number"):
    session.config(session_lib.TrainChoice(slices=2))
  with pytest.raises(volume_lib.VolumeError, match=r"Channels: channel\(s\) \['SE'\]"):
    session.config(session_lib.TrainChoice(channels=("SE",)))
  with pytest.raises(session_lib.SessionError, match="'batch' is not FIELD=VALUE"):
    session.config(session_lib.TrainChoice(overrides="batch"))
  with pytest.raises(session_lib.SessionError, match="no field train.batch"):
    session.config(session_lib.TrainChoice(overrides="train.batch=4"))
  config = session.config(session_lib.TrainChoice(steps=8, overrides=TINY))
  assert config.model.features == (4, 8, 8) and config.train.batch_size == 4
  assert config.data.channels == "ICE,TLD" and config.train.eval_every == 2
  with pytest.raises(session_lib.SessionError, match="no trained run yet"):
    session.preview(0)
  session.save_painted(np.zeros(session.volume.shape, np.uint8))  # every label wiped
  with pytest.raises(session_lib.SessionError, match="nothing to train on: paint"):
    session.train(session_lib.TrainChoice())


def test_cancel_resume_refine_preview_segment_quantify(tmp_path):
  """Cancel keeps a checkpoint and Train resumes it; a finished run is refined in the
  next run folder from its weights; preview, segmentation, ranking and quantification
  read the newest run."""
  session = session_lib.Session(make_volume(str(tmp_path / "vol.zarr")))
  choice = session_lib.TrainChoice(steps=4, overrides=TINY)
  stop = threading.Event()
  stop.set()  # Cancel pressed at once: the first step is finished and saved
  workdir, summary = session.train(choice, stop)
  assert summary is None and workdir.endswith("run_1")
  assert checkpoint.latest_step(workdir) == 1
  workdir, summary = session.train(choice)
  assert workdir.endswith("run_1") and summary["step"] == 4
  curve = session.curve(workdir)
  assert curve["step"][-1] == 4 and curve["val_step"][-1] == 4 and len(curve["val_miou"]) >= 3

  workdir2, summary = session.train(choice)
  assert workdir2.endswith("run_2") and summary["step"] == 4
  assert metrics_writer.saved_config(workdir2)["train"]["init_from"] == workdir

  # Another slab depth cannot take run_2's weights: run_3 starts from scratch.
  workdir3, _ = session.train(dataclasses.replace(choice, slices=1))
  assert workdir3.endswith("run_3")
  assert not metrics_writer.saved_config(workdir3)["train"]["init_from"]

  labels, uncertainty = session.preview(2)
  assert labels.shape == (48, 48) and labels.min() >= 1 and labels.max() <= len(CLASSES)
  assert uncertainty.shape == (48, 48) and 0 <= uncertainty.min() <= uncertainty.max() <= 1

  result = session.segment()
  assert result.complete and result.blocks_done == 6
  again = session.segment()  # finished: opened as it is, not recomputed or refused
  assert again.complete and again.blocks_done == 0 and again.output == result.output
  seg = session.segmentation()
  assert seg.startswith(os.path.join(workdir3, "segmentation_step"))  # the newest run
  suggested = session.next_slices(top=2)
  assert len(suggested) == 2 and not set(suggested) & {1, 3, 4}
  rows, report = session.quantify()
  assert [r["phase"] for r in rows] == list(CLASSES)
  assert abs(sum(r["volume_fraction"] for r in rows) - 1) < 1e-6
  assert "| pore |" in open(report).read()


def test_ingest_folder_reads_one_subfolder_per_channel(tmp_path):
  folder = tmp_path / "stack"
  subprocess.run(
    [sys.executable, "-m", "fibseg_jax.cli", "make-synthetic", f"--out={folder}",
     "--shape=4,32,32", "--annotate=1,2", "--format=tiff"],
    check=True, capture_output=True,
  )  # fmt: skip
  classes = ["pore", "csh", "portlandite", "clinker"]
  out = session_lib.ingest_folder(folder, classes=classes, voxel_size_nm=(50, 25, 25))
  assert out == f"{folder}.zarr"
  vol = volume_lib.open_volume(out)
  assert vol.channels == ("ICE", "TLD") and vol.classes == tuple(classes)
  assert vol.metadata.annotated_slices == (1, 2) and vol.shape == (4, 32, 32)
  with pytest.raises(session_lib.SessionError, match="exists already"):
    session_lib.ingest_folder(folder, classes=classes, voxel_size_nm=(50, 25, 25))
  (tmp_path / "empty" / "ICE").mkdir(parents=True)
  with pytest.raises(session_lib.SessionError, match="no subfolder of slice images"):
    session_lib.ingest_folder(tmp_path / "empty", classes=classes, voxel_size_nm=(50, 25, 25))


def test_strokes_train_with_a_forest_teacher(tmp_path):
  """Painted strokes only, "also learn from a random forest": the forest is fitted on the
  strokes, its probabilities over the stack are the run's teacher, and the run trains."""
  session = session_lib.Session(make_volume(str(tmp_path / "vol.zarr")))
  truth = {z: session.volume.read_labels(z) for z in (1, 3, 4)}
  painted = np.zeros(session.volume.shape, np.uint8)
  for z, labels in truth.items():
    rows = slice(20, 23)  # a 3-pixel stroke across the slice, classes from 1
    painted[z, rows] = labels[rows] + 1
  session.save_painted(painted)
  choice = session_lib.TrainChoice(steps=4, overrides=TINY, forest_teacher=True)
  assert session.config(choice).distill.teacher == "forest"
  workdir, summary = session.train(choice)
  assert summary["step"] == 4
  assert os.path.isdir(os.path.join(workdir, "teacher", "probabilities.zarr"))
  rows = metrics_writer.read_metrics(os.path.join(workdir, "metrics.jsonl"))
  assert all(np.isfinite(r["distill"]) for r in rows if "loss" in r)
