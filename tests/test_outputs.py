"""No command deletes or overwrites what it did not write (fibseg_jax.outputs).

Each writer is pointed, with and without --overwrite, at a folder of raw TIFFs with an
unrelated file in it, at its own input, and at an earlier output of its own kind.
"""

import dataclasses
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import tifffile

from fibseg_jax import eval as evaluation
from fibseg_jax import outputs
from fibseg_jax.bench import report as bench_report
from fibseg_jax.data import ingest, synth, volume
from fibseg_jax.eval import uncertainty
from fibseg_jax.infer import export, store
from fibseg_jax.study import comparison, runs, semi

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import segment_child  # noqa: E402 - tiny models shared with the subprocess tests

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
INGEST = os.path.join(REPO, "experiments", "ingest.py")
CLASSES = ("pore", "solid", "grain")


def raw_folder(root, n=4, shape=(32, 32)):
  """An instrument's folder: ICE/, TLD/, labels/ TIFFs and someone's notes.txt."""
  rng = np.random.default_rng(0)
  for d in ("ICE", "TLD", "labels"):
    os.makedirs(os.path.join(root, d))
  for z in range(n):
    for d in ("ICE", "TLD"):
      tifffile.imwrite(
        os.path.join(root, d, f"s_{z:03d}.tif"), rng.integers(0, 60000, shape, np.uint16)
      )
  for z in (1, 2):
    tifffile.imwrite(
      os.path.join(root, "labels", f"s_{z:03d}.tif"),
      rng.integers(0, len(CLASSES), shape, np.uint8),
    )
  with open(os.path.join(root, "notes.txt"), "w") as f:
    f.write("my notes\n")
  return root


def snapshot(root):
  """Every file under `root` with its bytes."""
  files = {}
  for dirpath, _, names in os.walk(root):
    for name in names:
      path = os.path.join(dirpath, name)
      with open(path, "rb") as f:
        files[os.path.relpath(path, root)] = f.read()
  return files


def plan(root):
  return ingest.plan_ingest(
    {"ICE": f"{root}/ICE/*.tif", "TLD": f"{root}/TLD/*.tif"},
    f"{root}/labels/*.tif",
    CLASSES,
  )


def run_ingest(root, out, overwrite=False):
  return ingest.ingest(
    plan(root), out, voxel_size_nm=(50, 25, 25), overwrite=overwrite, progress=False
  )


def test_ingest_into_the_raw_folder_deletes_nothing(tmp_path):
  """The data-loss case of issue 17, through the command line: one line, exit 1."""
  raw = raw_folder(str(tmp_path / "danger"))
  before = snapshot(raw)
  for extra in ([], ["--overwrite"]):
    done = subprocess.run(
      [
        sys.executable,
        INGEST,
        f"--channel=ICE={raw}/ICE/*.tif",
        f"--channel=TLD={raw}/TLD/*.tif",
        f"--labels={raw}/labels/*.tif",
        f"--classes={','.join(CLASSES)}",
        "--voxel_size_nm=50,25,25",
        f"--out={raw}",
        *extra,
      ],
      capture_output=True,
      text=True,
      check=False,
    )
    assert done.returncode == 1, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "contains the input --channel=ICE" in lines[0], done.stderr
  assert snapshot(raw) == before


@pytest.mark.parametrize("overwrite", [False, True])
def test_ingest_refuses_what_it_did_not_write(tmp_path, overwrite):
  raw = raw_folder(str(tmp_path / "raw"))
  other = tmp_path / "somedir"
  other.mkdir()
  (other / "notes.txt").write_text("keep")
  with pytest.raises(ingest.IngestError, match="not a fibseg volume output"):
    run_ingest(raw, str(other), overwrite=overwrite)
  assert (other / "notes.txt").read_text() == "keep"
  a_file = tmp_path / "file.zarr"
  a_file.write_text("keep")
  with pytest.raises(ingest.IngestError, match="is a file that is not"):
    run_ingest(raw, str(a_file), overwrite=overwrite)
  # The input itself (a single file given as the channel).
  with pytest.raises(ingest.IngestError, match="is the input --channel=ICE"):
    run_ingest(raw, f"{raw}/ICE/s_000.tif", overwrite=overwrite)
  assert len(snapshot(raw)) == 11


def test_ingest_replaces_only_its_earlier_volume(tmp_path):
  raw = raw_folder(str(tmp_path / "raw"))
  out = str(tmp_path / "vol.zarr")
  run_ingest(raw, out)
  with pytest.raises(ingest.IngestError, match="already exists; pass --overwrite"):
    run_ingest(raw, out)
  meta = run_ingest(raw, out, overwrite=True)
  assert volume.open_volume(out).metadata.annotated_slices == meta.annotated_slices == (1, 2)
  assert [p for p in os.listdir(tmp_path) if p.startswith(".")] == []
  # An empty directory made for the volume is fine.
  empty = tmp_path / "empty.zarr"
  empty.mkdir()
  run_ingest(raw, str(empty))
  assert volume.is_volume(str(empty))


def test_stale_partials_are_removed_and_reported(tmp_path, capsys):
  raw = raw_folder(str(tmp_path / "raw"))
  out = tmp_path / "big.zarr"
  legacy = tmp_path / ".big.zarr.partial-1a2b3c4d"  # the naming before owners were kept
  legacy.mkdir()
  (legacy / "chunk").write_bytes(b"x" * 5000)
  dead = subprocess.run(
    [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
  )
  killed = os.path.basename(outputs.partial_sibling(out)).replace(
    f"-{os.getpid()}-", f"-{int(dead.stdout)}-"
  )
  (tmp_path / killed).mkdir()
  sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
  try:
    running = os.path.basename(outputs.partial_sibling(out)).replace(
      f"-{os.getpid()}-", f"-{sleeper.pid}-"
    )
    (tmp_path / running).mkdir()  # another run still writing: left alone
    run_ingest(raw, str(out))
  finally:
    sleeper.kill()
  said = capsys.readouterr().out
  assert f"removed {legacy} (4.9 KB)" in said and killed in said
  left = sorted(p for p in os.listdir(tmp_path) if p.startswith("."))
  assert left == [running]


def test_synthetic_stack_replaces_only_its_own_folder(tmp_path):
  stack = synth.generate(synth.SynthConfig(shape=(3, 32, 32), seed=0))
  raw = raw_folder(str(tmp_path / "raw"))
  before = snapshot(raw)
  with pytest.raises(ValueError, match="not a fibseg synthetic stack output"):
    synth.write_tiff_folders(stack, raw, annotate=[1], overwrite=True)
  assert snapshot(raw) == before
  out = str(tmp_path / "synth")
  synth.write_tiff_folders(stack, out, annotate=[1])
  synth.write_tiff_folders(stack, out, annotate=[0], overwrite=True)
  assert os.listdir(os.path.join(out, "labels")) == ["slice_0000.tif"]


@pytest.fixture(scope="module")
def segmented(tmp_path_factory):
  """A small volume and a finished segmentation of it, on disk."""
  tmp = tmp_path_factory.mktemp("seg")
  root = str(tmp / "vol.zarr")
  rng = np.random.default_rng(1)
  with volume.create_volume(
    root,
    shape=(3, 32, 32),
    dtype="uint16",
    channels=("ICE",),
    classes=CLASSES,
    voxel_size_nm=(50, 25, 25),
  ) as w:
    for z in range(3):
      labels = rng.integers(0, len(CLASSES), (32, 32)) if z == 1 else None
      w.write_slice(z, rng.integers(0, 60000, (32, 32, 1), np.uint16), labels)
    w.commit()
  vol = volume.open_volume(root)
  model, variables = segment_child.pixel_model(len(CLASSES), 1)
  seg = str(tmp / "seg.zarr")
  from fibseg_jax import infer

  infer.segment_volume(
    vol,
    model,
    variables,
    output=seg,
    uncertainty=str(tmp / "unc.zarr"),
    channels=("ICE",),
    slices=3,
    settings=infer.SegmentSettings(tile=16, overlap=4, block=32, batch=2, progress=False),
  )
  return {
    "root": root,
    "vol": vol,
    "model": (model, variables),
    "seg": seg,
    "unc": str(tmp / "unc.zarr"),
  }


def test_segment_refuses_what_it_did_not_write(segmented, tmp_path):
  from fibseg_jax import infer

  raw = raw_folder(str(tmp_path / "raw"))
  before = snapshot(raw)
  model, variables = segmented["model"]
  common = dict(channels=("ICE",), slices=3)
  settings = infer.SegmentSettings(tile=16, overlap=4, block=32, progress=False)
  for overwrite in (False, True):
    given = dataclasses.replace(settings, overwrite=overwrite)
    with pytest.raises(store.OutputError, match="not a zarr array|not a labels array"):
      infer.segment_volume(segmented["vol"], model, variables, output=raw, settings=given, **common)
    # A zarr array that segment.py did not write (the volume's own image array).
    with pytest.raises(store.OutputError, match="inside the input volume"):
      infer.segment_volume(
        segmented["vol"],
        model,
        variables,
        output=segmented["root"] + "/image",
        settings=given,
        **common,
      )
  assert snapshot(raw) == before
  foreign = str(tmp_path / "foreign.zarr")
  segment_child_array(foreign)
  with pytest.raises(store.OutputError, match="not a labels array written by `fibseg segment`"):
    infer.segment_volume(
      segmented["vol"],
      model,
      variables,
      output=foreign,
      settings=dataclasses.replace(settings, overwrite=True),
      **common,
    )
  assert store.read_attributes(foreign) == {"mine": True}


def segment_child_array(path):
  import tensorstore as ts

  ts.open(
    {
      "driver": "zarr3",
      "kvstore": volume.kvstore_spec(path),
      "metadata": {"shape": [3, 32, 32], "data_type": "uint8", "attributes": {"mine": True}},
      "create": True,
    }
  ).result()


def test_exports_replace_only_exports(segmented, tmp_path):
  raw = raw_folder(str(tmp_path / "raw"))
  before = snapshot(raw)
  for fmt in ("zarr", "tiff"):
    with pytest.raises(store.OutputError, match="not a fibseg"):
      export.export_segmentation(segmented["seg"], fmt, raw, overwrite=True)
  with pytest.raises(store.OutputError, match="contains the input --(output|input)"):
    export.export_segmentation(
      segmented["seg"], "zarr", os.path.dirname(segmented["root"]), overwrite=True
    )
  assert snapshot(raw) == before
  path = str(tmp_path / "seg.ome.zarr")
  export.export_segmentation(segmented["seg"], "zarr", path)
  export.export_segmentation(segmented["seg"], "zarr", path)  # its own export: replaced


def test_report_and_suggest_directories(segmented, tmp_path):
  raw = raw_folder(str(tmp_path / "raw"))
  before = snapshot(raw)
  with pytest.raises(ValueError, match="not a fibseg suggest output"):
    uncertainty.suggest(segmented["unc"], raw, annotated=(), top=1)
  assert snapshot(raw) == before
  out = str(tmp_path / "suggest")
  uncertainty.suggest(segmented["unc"], out, annotated=(), top=1)
  uncertainty.suggest(segmented["unc"], out, annotated=(), top=2)  # rerun into its own
  assert outputs.marker_kind(out) == "suggest"
  with pytest.raises(ValueError, match="is the input --uncertainty"):
    uncertainty.suggest(segmented["unc"], segmented["unc"], annotated=(), top=1)
  report = evaluation.evaluate(segmented["seg"], segmented["root"], (1,), structure=False)
  with pytest.raises(evaluation.EvaluationError, match="not a fibseg report output"):
    evaluation.write_report(report, raw)
  assert snapshot(raw) == before
  with pytest.raises(evaluation.EvaluationError, match="contains the input --(prediction|truth)"):
    evaluation.write_report(report, os.path.dirname(segmented["root"]))
  paths = evaluation.write_report(report, str(tmp_path / "report"))
  assert os.path.exists(paths["markdown"])


def test_study_sweep_semi_and_bench_directories(tmp_path):
  raw = raw_folder(str(tmp_path / "raw"))
  before = snapshot(raw)
  with pytest.raises(comparison.StudyError, match="not a fibseg study output"):
    comparison.check_output(raw, comparison.STUDY_CONFIG, {"a": 1})
  with pytest.raises(comparison.StudyError, match="not a fibseg sweep output"):
    comparison.check_output(raw, "sweep_config.json", {"a": 1})
  with pytest.raises(ValueError, match="not a fibseg semi study output"):
    runs.claim_study_directory(raw, None, kind=semi.KIND, legacy=semi.LEGACY)
  with pytest.raises(outputs.OutputError, match="not a fibseg benchmark output"):
    bench_report.write({}, raw)
  assert snapshot(raw) == before
  out = str(tmp_path / "study")
  comparison.check_output(out, comparison.STUDY_CONFIG, {"a": 1})
  comparison.check_output(out, comparison.STUDY_CONFIG, {"a": 1})  # resumes its own
  with open(os.path.join(out, outputs.MARKER)) as f:
    assert json.load(f)["kind"] == "study"


# --- a full disk -------------------------------------------------------------------------
@pytest.fixture()
def small_disk(tmp_path):
  """A 300 KB tmpfs (root only, as CI runs); `grow()` frees space by enlarging it."""
  mount = tmp_path / "disk"
  mount.mkdir()
  if os.geteuid() != 0:
    pytest.skip("the full-disk tests mount a tmpfs: run as root (CI does)")
  done = subprocess.run(
    ["mount", "-t", "tmpfs", "-o", "size=300k", "tmpfs", str(mount)], capture_output=True
  )
  if done.returncode != 0:
    pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")

  def grow():
    subprocess.run(["mount", "-o", "remount,size=64m", str(mount)], check=True)

  try:
    yield mount, grow
  finally:
    subprocess.run(["umount", "-l", str(mount)], check=False)


def test_ingest_on_a_full_disk_leaves_nothing_and_reruns(tmp_path, small_disk):
  mount, grow = small_disk
  raw = raw_folder(str(tmp_path / "raw"), n=8, shape=(256, 256))
  out = str(mount / "vol.zarr")
  with pytest.raises(volume.VolumeError) as e:
    run_ingest(raw, out)
  message = str(e.value)
  assert message.startswith(f"--out={out}: no space left on the device; the volume needs about")
  assert "\n" not in message and "rerun" in message
  assert os.listdir(mount) == []  # no partial volume, no corrupt one
  grow()
  run_ingest(raw, out)
  vol = volume.open_volume(out)
  np.testing.assert_array_equal(
    vol.read_image(3)[..., 0], tifffile.imread(os.path.join(raw, "ICE", "s_003.tif"))
  )


# --- segmentation-only stacks and stray label values ---------------------------------
def test_a_stack_without_labels_is_ingested_for_segmentation(tmp_path, segmented):
  raw = raw_folder(str(tmp_path / "raw"))
  p = ingest.plan_ingest({"ICE": f"{raw}/ICE/*.tif"}, None, None)
  out = str(tmp_path / "seg_only.zarr")
  meta = ingest.ingest(p, out, voxel_size_nm=(50, 25, 25), progress=False)
  assert meta.classes == () and meta.annotated_slices == ()
  vol = volume.open_volume(out)
  from fibseg_jax import infer

  model, variables = segmented["model"]
  seg = str(tmp_path / "seg.zarr")
  infer.segment_volume(
    vol,
    model,
    variables,
    output=seg,
    classes=CLASSES,
    channels=("ICE",),
    slices=3,
    settings=infer.SegmentSettings(tile=16, overlap=4, block=32, progress=False),
  )
  assert store.read_attributes(seg)["classes"] == list(CLASSES)


def test_stray_label_values_are_refused_without_classes(tmp_path):
  raw = raw_folder(str(tmp_path / "raw"))
  stray = tifffile.imread(f"{raw}/labels/s_002.tif")
  stray[5, 5] = 7
  tifffile.imwrite(f"{raw}/labels/s_002.tif", stray)
  p = ingest.plan_ingest({"ICE": f"{raw}/ICE/*.tif"}, f"{raw}/labels/*.tif", None)
  with pytest.raises(ingest.IngestError) as e:
    ingest.ingest(p, str(tmp_path / "v.zarr"), voxel_size_nm=(1, 1, 1), progress=False)
  assert "[3, 4, 5, 6] never occur" in str(e.value) and "s_002.tif" in str(e.value)
  assert "--classes" in str(e.value)
  # Naming the classes keeps them, empty ones included.
  p = ingest.plan_ingest(
    {"ICE": f"{raw}/ICE/*.tif"}, f"{raw}/labels/*.tif", [f"c{i}" for i in range(8)]
  )
  meta = ingest.ingest(p, str(tmp_path / "v.zarr"), voxel_size_nm=(1, 1, 1), progress=False)
  assert len(meta.classes) == 8
  # Label files that hold nothing say so, not "--classes".
  for f in os.listdir(f"{raw}/labels"):
    tifffile.imwrite(f"{raw}/labels/{f}", np.full((32, 32), 255, np.uint8))
  p = ingest.plan_ingest({"ICE": f"{raw}/ICE/*.tif"}, f"{raw}/labels/*.tif", None)
  with pytest.raises(ingest.IngestError, match="hold no class values .* leave out --labels"):
    ingest.ingest(p, str(tmp_path / "w.zarr"), voxel_size_nm=(1, 1, 1), progress=False)


def test_segment_on_a_full_disk_stops_and_resumes(tmp_path, small_disk, segmented):
  from fibseg_jax import infer

  mount, grow = small_disk
  rng = np.random.default_rng(2)
  root = str(tmp_path / "big.zarr")
  with volume.create_volume(
    root,
    shape=(8, 128, 128),
    dtype="uint16",
    channels=("ICE",),
    classes=CLASSES,
    voxel_size_nm=(50, 25, 25),
  ) as w:
    for z in range(8):
      w.write_slice(z, rng.integers(0, 60000, (128, 128, 1), np.uint16))
    w.commit()
  vol = volume.open_volume(root)
  model, variables = segmented["model"]
  common = dict(
    channels=("ICE",),
    slices=3,
    settings=infer.SegmentSettings(tile=32, overlap=8, block=64, batch=4, progress=False),
  )
  reference = str(tmp_path / "ref.zarr")
  infer.segment_volume(
    vol, model, variables, output=reference, probabilities=reference + ".p", **common
  )
  out, probs = str(mount / "seg.zarr"), str(mount / "probs.zarr")
  with pytest.raises(store.OutputError) as e:
    infer.segment_volume(vol, model, variables, output=out, probabilities=probs, **common)
  message = str(e.value)
  assert message.startswith(f"--output={out}: no space left on the device"), message
  assert "\n" not in message and "needs about" in message
  grow()
  result = infer.segment_volume(vol, model, variables, output=out, probabilities=probs, **common)
  assert result.complete and result.blocks_skipped > 0
  np.testing.assert_array_equal(
    infer.open_array(out).read().result(), infer.open_array(reference).read().result()
  )
  np.testing.assert_array_equal(
    infer.open_array(probs).read().result(), infer.open_array(reference + ".p").read().result()
  )
