"""Sparse labels as users paint them: 0 = not painted, strokes, every Nth slice."""

import os
import subprocess
import sys
import uuid

import imageio.v3 as iio
import numpy as np
import PIL.Image
import pytest
import tifffile

from fibseg_jax.data import ingest, split, volume
from fibseg_jax.data.loader import LoaderConfig, SlabLoader
from fibseg_jax.train import config as config_lib
from fibseg_jax.train import data_config, loop

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(REPO, "experiments", "ingest.py")
IGNORE = volume.IGNORE_LABEL


def _images(root, depth, shape, seed=0):
  """Writes `depth` uint8 ICE TIFFs numbered 0..depth-1; returns their glob."""
  rng = np.random.default_rng(seed)
  os.makedirs(os.path.join(root, "ICE"), exist_ok=True)
  for n in range(depth):
    image = rng.integers(0, 255, shape, dtype=np.uint8)
    tifffile.imwrite(os.path.join(root, "ICE", f"ice_{n:04d}.tif"), image)
  return {"ICE": os.path.join(root, "ICE", "*.tif")}


def _to_painted(labels):
  """The 255 convention (255 = not annotated, classes 0..K-1) -> napari's (0, 1..K)."""
  return np.where(labels == IGNORE, 0, labels.astype(np.int64) + 1).astype(np.uint8)


def _write_labels(folder, labels, palette_slice=None):
  """{number: [y, x] uint8} -> slice_NNNN.png, one of them an indexed-colour PNG."""
  os.makedirs(folder, exist_ok=True)
  for n, lab in labels.items():
    path = os.path.join(folder, f"slice_{n:04d}.png")
    if n == palette_slice:
      image = PIL.Image.fromarray(lab, mode="P")
      image.putpalette([(37 * i) % 256 for i in range(768)])  # no colour equals its index
      image.save(path)
    else:
      iio.imwrite(path, lab)
  return os.path.join(folder, "*.png")


def _strokes(shape, classes, fraction, rng, width=3):
  """[y, x] uint8 labels: straight brush strokes over `fraction` of the slice, 255 elsewhere."""
  labels = np.full(shape, IGNORE, np.uint8)
  height, breadth = shape
  while (labels != IGNORE).mean() < fraction:
    angle, length = rng.uniform(0, np.pi), int(rng.integers(15, 60))
    t = np.arange(length)
    y = np.clip(rng.integers(0, height) + t * np.sin(angle), 0, height - width).astype(int)
    x = np.clip(rng.integers(0, breadth) + t * np.cos(angle), 0, breadth - width).astype(int)
    c = rng.integers(classes)
    for dy in range(width):
      for dx in range(width):
        labels[y + dy, x + dx] = c
  return labels


def _ingest(channels, labels, classes=None, unlabelled=255, out=None):
  plan = ingest.plan_ingest(channels, labels, classes)
  out = out or f"memory://sparse-{uuid.uuid4().hex[:8]}"
  meta = ingest.ingest(plan, out, voxel_size_nm=(10, 5, 5), progress=False, unlabelled=unlabelled)
  return out, meta


@pytest.mark.parametrize("classes", [None, ("pore", "csh", "portlandite")])
def test_painted_labels_ingest_to_the_same_volume(tmp_path, classes):
  shape = (24, 20)
  channels = _images(str(tmp_path), 6, shape)
  rng = np.random.default_rng(1)
  labels = {}
  for n in (1, 4):
    lab = rng.integers(0, 3, shape, dtype=np.uint8)
    lab[:5] = IGNORE  # unlabelled rows
    labels[n] = lab
  labels[3] = np.full(shape, IGNORE, np.uint8)  # a label file with nothing painted
  glob255 = _write_labels(str(tmp_path / "l255"), labels, palette_slice=4)
  glob0 = _write_labels(
    str(tmp_path / "l0"), {n: _to_painted(v) for n, v in labels.items()}, palette_slice=4
  )
  root255, meta255 = _ingest(channels, glob255, classes)
  root0, meta0 = _ingest(channels, glob0, classes, unlabelled=0)
  assert meta0 == meta255
  assert meta0.annotated_slices == (1, 4) and len(meta0.classes) == 3
  vol0, vol255 = volume.open_volume(root0), volume.open_volume(root255)
  stored = vol0.read_labels(slice(None))
  np.testing.assert_array_equal(stored, vol255.read_labels(slice(None)))
  np.testing.assert_array_equal(stored[4], labels[4])  # the palette PNG, by its indices
  assert np.all(stored[3] == IGNORE)


def test_labels_on_every_nth_slice(tmp_path):
  shape = (16, 12)
  channels = _images(str(tmp_path), 13, shape)
  rng = np.random.default_rng(2)
  labels = {n: rng.integers(1, 3, shape, dtype=np.uint8) for n in range(0, 13, 4)}  # 0, 4, 8, 12
  root, meta = _ingest(channels, _write_labels(str(tmp_path / "l"), labels), unlabelled=0)
  assert meta.shape == (13, 16, 12) and meta.classes == ("class0", "class1")
  assert meta.annotated_slices == (0, 4, 8, 12)
  vol = volume.open_volume(root)
  np.testing.assert_array_equal(vol.read_labels(8), labels[8] - 1)
  assert np.all(vol.read_labels(5) == IGNORE)


def test_stroke_only_slices_ingest_and_load(tmp_path):
  shape = (256, 256)
  channels = _images(str(tmp_path), 7, shape)
  rng = np.random.default_rng(3)
  labels = {n: _to_painted(_strokes(shape, 4, 0.02, rng)) for n in (1, 3, 5)}
  assert all(np.mean(v > 0) < 0.025 for v in labels.values())  # 2% of each slice
  root, meta = _ingest(channels, _write_labels(str(tmp_path / "l"), labels), unlabelled=0)
  assert meta.annotated_slices == (1, 3, 5) and len(meta.classes) == 4
  config = LoaderConfig(
    channels=("ICE",), slices=3, patch=64, batch_size=4, prefetch=0, workers=1
  )  # default val_fraction=0.25, val_block=128
  with SlabLoader(volume.open_volume(root), config) as loader:
    labelled = sum(int(np.sum(v > 0)) for v in labels.values())
    assert loader.train_area + loader.val_area == labelled
    assert 0.15 < loader.val_area / labelled < 0.35
    assert np.all(loader.class_counts() > 0)
    batch = next(loader.batches())
    assert batch["image"].shape == (4, 3, 64, 64, 1)
    assert batch["labels"].shape == (4, 64, 64)
    trained = batch["labels"] != IGNORE
    assert trained.any() and trained.mean() < 0.2  # strokes, not whole patches
    assert set(np.unique(batch["labels"][trained])) <= {0, 1, 2, 3}
    # `fibseg train` points a user with strokes to the forest teacher, once.
    train_config = config_lib.base_config()
    hint = loop.sparse_labels_hint(loader, volume.open_volume(root), config_lib.parse(train_config))
    assert hint.startswith("note: 2.1% of the training slices' pixels are labelled")
    assert "--config.distill.teacher=forest" in hint
    train_config.distill.teacher = "forest"
    stroked = config_lib.parse(train_config)
    assert loop.sparse_labels_hint(loader, volume.open_volume(root), stroked) is None


def _stroke_volume(strokes_by_slice, shape, classes=4):
  root = f"memory://strokes-{uuid.uuid4().hex[:8]}"
  names = [f"c{i}" for i in range(classes)]
  with volume.create_volume(
    root, shape=shape, dtype="uint8", channels=["ICE"], classes=names, voxel_size_nm=(1, 1, 1)
  ) as writer:
    for z in range(shape[0]):
      image = np.full(shape[1:] + (1,), z, np.uint8)
      writer.write_slice(z, image, strokes_by_slice.get(z))
    writer.commit()
  return volume.open_volume(root)


def test_split_keeps_training_pixels_of_a_class_painted_in_one_block():
  # Strokes put all of class 3 into one 128-px block: whichever seed draws the split,
  # that block must stay in training, or class 3 would never be trained on.
  rng = np.random.default_rng(4)
  labels = _strokes((256, 256), 3, 0.02, rng)
  labels[20:23, 10:60] = 3
  vol = _stroke_volume({1: labels}, (3, 256, 256))
  for seed in range(8):
    s = split.Split(vol, (1,), val_block=128, patch=64, val_fraction=0.25, split_seed=seed)
    assert s.class_counts()[3] == 150
    assert not s.val_blocks[0, 0, 0]
    assert s.val_area > 0


def test_too_few_labelled_blocks_name_the_flags_and_the_counts():
  labels = np.full((128, 128), IGNORE, np.uint8)
  labels[40:43, 10:100] = 0
  labels[80:83, 10:100] = 1  # 540 labelled pixels, all in the one 128-px block
  vol = _stroke_volume({1: labels}, (3, 128, 128), classes=2)
  config = LoaderConfig(
    channels=("ICE",), slices=1, patch=64, batch_size=2, prefetch=0, flag_names=data_config.FLAGS
  )
  with pytest.raises(split.LoaderError) as error:
    SlabLoader(vol, config)
  message = str(error.value)
  assert "--config.data.val_block=128 is too coarse" in message
  assert "--config.data.val_fraction=0.25 of the 540 annotated pixels" in message
  assert "1 of 1 blocks of 128 x 128 px" in message
  # A smaller block splits the same strokes.
  smaller = LoaderConfig(channels=("ICE",), slices=1, patch=32, batch_size=2, val_block=32)
  with SlabLoader(vol, smaller) as loader:
    assert loader.val_area > 0 and loader.train_area > 0


def _expect(match, channels, labels, classes=None, unlabelled=0):
  with pytest.raises(ingest.IngestError, match=match):
    _ingest(channels, labels, classes, unlabelled=unlabelled)


def test_painted_label_errors_speak_the_users_values(tmp_path):
  shape = (16, 12)
  channels = _images(str(tmp_path), 4, shape)
  folder = str(tmp_path / "l")
  lab = np.zeros(shape, np.uint8)
  lab[:4] = 1
  lab[4:8] = 2
  lab[8:10] = 4  # a stray value above a gap: 3 never occurs
  glob = _write_labels(folder, {1: lab, 2: np.ones(shape, np.uint8)})
  _expect(
    r"values \[1, 2, 4\] are present but \[3\] never occur, so 1 of 4 classes would be empty "
    r"\(value\(s\) \[4\] first in .*slice_0001.png with --labels_unlabelled=0\).* "
    r"one name per value 1..4",
    channels,
    glob,
  )
  _expect(
    r"slice_0001.png holds label values \[4\] but --classes names 3 classes .*"
    r"\(valid: 1..3, 0 = not annotated with --labels_unlabelled=0\)",
    channels,
    glob,
    classes=("a", "b", "c"),
  )
  lab[8:10] = 255  # 255 is a class value in this convention, and one too many
  _write_labels(folder, {1: lab})
  _expect(
    r"slice_0001.png holds label values \[255\]; class indices must be 1..254 "
    r"\(0 = not annotated with --labels_unlabelled=0\)",
    channels,
    glob,
  )
  _write_labels(folder, {1: np.zeros(shape, np.uint8), 2: np.zeros(shape, np.uint8)})
  _expect(
    r"hold no class values \(all 0 = not annotated with --labels_unlabelled=0\)", channels, glob
  )
  _expect(r"--labels_unlabelled=1: must be 255 .* or 0", channels, glob, unlabelled=1)
  # The same files in the 255 convention: 0 is a class, and the messages say 0..K-1.
  _write_labels(folder, {1: lab})
  _expect(
    r"slice_0001.png holds label values \[1, 2\] but --classes names 1 classes \['a'\] "
    r"\(valid: 0..0, 255 = not annotated\); fix the stray values",
    channels,
    glob,
    classes=("a",),
    unlabelled=255,
  )


def test_script_reads_painted_labels(tmp_path):
  shape = (16, 12)
  _images(str(tmp_path), 3, shape)
  lab = np.zeros(shape, np.uint8)
  lab[:6] = 2
  lab[6:9] = 1
  _write_labels(str(tmp_path / "l"), {1: lab})
  out = str(tmp_path / "vol.zarr")
  args = [
    sys.executable,
    SCRIPT,
    f"--channel=ICE={tmp_path}/ICE/*.tif",
    f"--labels={tmp_path}/l/*.png",
    "--voxel_size_nm=50,25,25",
    f"--out={out}",
    "--labels_unlabelled=0",
  ]
  done = subprocess.run(args, capture_output=True, text=True, check=False)
  assert done.returncode == 0, done.stderr
  assert "classes ['class0', 'class1'], annotated slices [1]" in done.stdout
  np.testing.assert_array_equal(
    volume.open_volume(out).read_labels(1), np.where(lab == 0, IGNORE, lab - 1)
  )
  bad = subprocess.run(args[:-1] + ["--labels_unlabelled=1", "--overwrite"], **_QUIET)
  assert bad.returncode != 0 and "labels_unlabelled" in bad.stderr
  assert "Traceback" not in bad.stderr


_QUIET = dict(capture_output=True, text=True, check=False)
