"""Ingest: TIFF/PNG folders -> volume, slice matching, and every user mistake."""

import os
import subprocess
import sys

import imageio.v3 as iio
import numpy as np
import PIL.Image
import pytest
import tifffile
import zarr

from fibseg_jax.data import ingest, volume

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(REPO, "experiments", "ingest.py")
CLASSES = ("pore", "csh", "portlandite")


def _make_stack(root, numbers=(9, 11, 8, 10), shape=(24, 20), labelled=(11, 8), seed=0):
  """Writes ICE as uint16 TIFFs, TLD as uint8 PNGs, labels as TIFFs with scrambled names."""
  rng = np.random.default_rng(seed)
  ice, tld, labels = {}, {}, {}
  for d in ("ICE", "TLD", "labels"):
    os.makedirs(os.path.join(root, d), exist_ok=True)
  for n in numbers:
    ice[n] = rng.integers(1000, 30000, shape, dtype=np.uint16)
    tld[n] = rng.integers(0, 255, shape, dtype=np.uint8)
    # Zero padding differs between detectors on purpose: order is by number, not text.
    tifffile.imwrite(os.path.join(root, "ICE", f"run2_ICE_{n:04d}.tif"), ice[n])
    iio.imwrite(os.path.join(root, "TLD", f"tld-{n}.png"), tld[n])
  for n in labelled:
    lab = rng.integers(0, len(CLASSES), shape, dtype=np.uint8)
    lab[:4] = 255
    labels[n] = lab
    tifffile.imwrite(os.path.join(root, "labels", f"seg_{n:03d}.tif"), lab)
  return ice, tld, labels


def _channels(root):
  return {"ICE": os.path.join(root, "ICE", "*.tif"), "TLD": os.path.join(root, "TLD", "*.png")}


def _run(root, out, **overrides):
  plan = ingest.plan_ingest(
    overrides.get("channels", _channels(root)),
    overrides.get("labels", os.path.join(root, "labels", "*.tif")),
    overrides.get("classes", CLASSES),
  )
  return ingest.ingest(plan, out, voxel_size_nm=(50, 25, 25), progress=False)


def test_round_trip_is_exact_and_ordered_by_number(tmp_path):
  ice, tld, labels = _make_stack(str(tmp_path))
  out = str(tmp_path / "vol.zarr")
  meta = _run(str(tmp_path), out)
  vol = volume.open_volume(out)
  order = sorted(ice)  # 8, 9, 10, 11
  assert vol.shape == (4, 24, 20) and vol.channels == ("ICE", "TLD")
  assert vol.image.dtype.name == "uint16"  # uint8 TLD is widened losslessly
  image = vol.read_image(slice(None))
  for z, n in enumerate(order):
    np.testing.assert_array_equal(image[z, :, :, 0], ice[n])
    np.testing.assert_array_equal(image[z, :, :, 1], tld[n])
  assert meta.annotated_slices == (order.index(8), order.index(11))
  for n, lab in labels.items():
    np.testing.assert_array_equal(vol.read_labels(order.index(n)), lab)
  assert np.all(vol.read_labels(order.index(9)) == volume.IGNORE_LABEL)
  assert vol.classes == CLASSES and vol.metadata.voxel_size_nm == (50.0, 25.0, 25.0)
  stats = vol.metadata.channel_stats["ICE"]
  assert 1000 <= stats["p0.5"] < stats["p50"] < stats["p99.5"] <= 30000
  # zarr-python reads the same group.
  group = zarr.open_group(out, mode="r")
  assert list(group.attrs["channels"]) == ["ICE", "TLD"]
  assert list(group.attrs["slice_numbers"]) == order
  np.testing.assert_array_equal(np.asarray(group["image"][1, :, :, 0]), ice[9])


def test_multipage_tiff_stacks_one_page_per_slice(tmp_path):
  rng = np.random.default_rng(1)
  stack = rng.integers(0, 255, (5, 16, 12), dtype=np.uint8)
  tifffile.imwrite(str(tmp_path / "ice_stack.tif"), stack)
  tifffile.imwrite(str(tmp_path / "tld_stack.tif"), stack[::-1], imagej=True)
  # A label stack as annotation tools export it: every page, 255 where nothing is drawn.
  label_stack = np.full((5, 16, 12), 255, np.uint8)
  label_stack[3] = rng.integers(0, 2, (16, 12))
  label_stack[1, :4] = 0  # partly annotated is annotated
  tifffile.imwrite(str(tmp_path / "labels.tif"), label_stack)
  plan = ingest.plan_ingest(
    {"ICE": str(tmp_path / "ice_stack.tif"), "TLD": str(tmp_path / "tld_stack.tif")},
    str(tmp_path / "labels.tif"),
    ["a", "b"],
  )
  out = str(tmp_path / "v.zarr")
  ingest.ingest(plan, out, voxel_size_nm=(1, 1, 1), progress=False)
  vol = volume.open_volume(out)
  np.testing.assert_array_equal(vol.read_image(slice(None))[..., 0], stack)
  np.testing.assert_array_equal(vol.read_image(slice(None))[..., 1], stack[::-1])
  assert vol.metadata.annotated_slices == (1, 3) and vol.image.dtype.name == "uint8"
  np.testing.assert_array_equal(vol.read_labels(3), label_stack[3])
  # Two stacks under one glob cannot be told apart from two slices.
  for part in (1, 2):
    tifffile.imwrite(str(tmp_path / f"part_{part}.tif"), stack)
  with pytest.raises(ingest.IngestError, match=r"part_1.tif: expected a 2D .*\(5, 16, 12\) \(a"):
    ingest.plan_ingest({"ICE": str(tmp_path / "part_*.tif")}, None, ["a", "b"])


def test_all_255_label_slice_is_not_annotated(tmp_path):
  _make_stack(str(tmp_path))
  tifffile.imwrite(tmp_path / "labels" / "seg_009.tif", np.full((24, 20), 255, np.uint8))
  meta = _run(str(tmp_path), str(tmp_path / "vol.zarr"))
  assert meta.annotated_slices == (0, 3)  # slices 8 and 11; not 9


def test_memory_kvstore_output(tmp_path):
  _make_stack(str(tmp_path))
  _run(str(tmp_path), "memory://ingest_test")
  assert volume.open_volume("memory://ingest_test").shape == (4, 24, 20)


def test_kvstore_prefix_holding_other_data_is_not_taken(tmp_path):
  # A failed write deletes its whole prefix, so a prefix that already holds anything
  # (not only a volume) must be refused up front.
  _make_stack(str(tmp_path))
  root = "memory://ingest_not_empty"
  kv = volume.ts.KvStore.open(volume.kvstore_spec(root), context=volume.CONTEXT).result()
  kv.write("notes.txt", b"keep me").result()
  for overwrite in (False, True):  # --overwrite replaces only an earlier volume
    plan = ingest.plan_ingest(_channels(str(tmp_path)), None, CLASSES)
    with pytest.raises(ingest.IngestError, match=r"not a fibseg volume"):
      ingest.ingest(plan, root, voxel_size_nm=(1, 1, 1), progress=False, overwrite=overwrite)
  assert kv.read("notes.txt").result().value == b"keep me"


def _expect_error(tmp_path, match, out=None, **overrides):
  out = out or str(tmp_path / "out.zarr")
  with pytest.raises(ingest.IngestError, match=match):
    _run(str(tmp_path), out, **overrides)
  leftovers = [p for p in os.listdir(tmp_path) if "out.zarr" in p]
  assert leftovers == [], f"failed ingest left {leftovers}"


def test_channel_lacking_a_slice_names_it(tmp_path):
  _make_stack(str(tmp_path))
  os.remove(tmp_path / "TLD" / "tld-10.png")
  _expect_error(
    tmp_path,
    r"--channel=TLD has 3 slices, --channel=ICE 4: --channel=TLD lacks slice number\(s\) "
    r"\[10\] that --channel=ICE has \(.*run2_ICE_0010.tif\)",
  )


def test_channel_number_mismatch(tmp_path):
  _make_stack(str(tmp_path))
  os.rename(tmp_path / "TLD" / "tld-10.png", tmp_path / "TLD" / "tld-12.png")
  _expect_error(
    tmp_path,
    r"TLD lacks slice number\(s\) \[10\] .*run2_ICE_0010.tif.*; --channel=TLD has slice "
    r"number\(s\) \[12\] that --channel=ICE lacks \(.*tld-12.png\)",
  )


def test_gap_in_the_numbering_names_the_missing_slices(tmp_path):
  _make_stack(str(tmp_path), numbers=(4, 5, 6, 8, 9, 12), labelled=(5,))
  _expect_error(
    tmp_path,
    r"--channel=ICE: slice number\(s\) \[7\] missing between .*run2_ICE_0006.tif and "
    r".*run2_ICE_0008.tif \(and 1 more gap\(s\)\); .*--allow_missing_slices",
  )
  plan = ingest.plan_ingest(_channels(str(tmp_path)), None, CLASSES, allow_missing_slices=True)
  assert plan.numbers == [4, 5, 6, 8, 9, 12] and plan.shape == (6, 24, 20)
  # Regular steps other than 1 (names carrying z in nm) and rounded ones are no gap.
  files = [ingest.SliceFile(n, f"z{n}.tif") for n in (500, 1000, 1500, 2500)]
  assert [m for _, _, m in ingest.missing_slices(files)] == [[2000]]
  files = [ingest.SliceFile(n, f"z{n}.tif") for n in (333, 667, 1000, 1333)]
  assert ingest.missing_slices(files) == []


def test_channel_shape_mismatch_first_slice(tmp_path):
  _make_stack(str(tmp_path))
  iio.imwrite(tmp_path / "TLD" / "tld-8.png", np.zeros((10, 10), np.uint8))
  _expect_error(tmp_path, r"--channel=TLD: .*tld-8.png has shape \(10, 10\), expected \(24, 20\)")


def test_slice_shape_mismatch_midway_leaves_nothing(tmp_path):
  _make_stack(str(tmp_path))
  tifffile.imwrite(tmp_path / "ICE" / "run2_ICE_0010.tif", np.zeros((24, 21), np.uint16))
  _expect_error(tmp_path, r"run2_ICE_0010.tif has shape \(24, 21\)")


def test_pixel_type_of_every_slice_is_checked(tmp_path):
  # A later slice at another bit depth used to be cast to the first slice's type:
  # uint16 values wrapped into uint8, floats truncated.
  _make_stack(str(tmp_path))
  tifffile.imwrite(tmp_path / "ICE" / "run2_ICE_0010.tif", np.full((24, 20), 0.5, np.float32))
  _expect_error(
    tmp_path, r"--channel=ICE: .*run2_ICE_0010.tif is float32 but .*run2_ICE_0008.tif is uint16"
  )
  _make_stack(str(tmp_path))
  iio.imwrite(tmp_path / "TLD" / "tld-11.png", np.full((24, 20), 300, np.uint16))
  _expect_error(tmp_path, r"--channel=TLD: .*tld-11.png is uint16 but .*tld-8.png is uint8")


def test_label_without_image_slice(tmp_path):
  _make_stack(str(tmp_path))
  tifffile.imwrite(tmp_path / "labels" / "seg_012.tif", np.zeros((24, 20), np.uint8))
  _expect_error(tmp_path, r"seg_012.tif has slice number 12 but no image slice has it")


def test_label_shape_mismatch(tmp_path):
  _make_stack(str(tmp_path))
  tifffile.imwrite(tmp_path / "labels" / "seg_008.tif", np.zeros((20, 24), np.uint8))
  _expect_error(tmp_path, r"seg_008.tif has shape \(20, 24\), image slices \(24, 20\)")


def test_palette_png_labels_are_read_as_class_indices(tmp_path):
  # Annotation tools save labels as indexed colour: index i drawn in some colour.
  ice, _, labels = _make_stack(str(tmp_path))
  os.remove(tmp_path / "labels" / "seg_008.tif")
  lab = labels[8]
  palette = np.zeros((256, 3), np.uint8)
  palette[:3] = [(200, 30, 30), (30, 200, 30), (30, 30, 200)]  # no colour equals its index
  palette[255] = (255, 255, 255)
  image = PIL.Image.fromarray(lab, mode="P")
  image.putpalette(palette.ravel().tolist())
  image.save(tmp_path / "labels" / "seg_008.png")
  out = str(tmp_path / "vol.zarr")
  meta = _run(str(tmp_path), out, labels=str(tmp_path / "labels" / "seg_*"))
  vol = volume.open_volume(out)
  assert meta.annotated_slices == (0, 3)
  np.testing.assert_array_equal(vol.read_labels(0), lab)
  np.testing.assert_array_equal(vol.read_labels(3), labels[11])


def test_single_page_tiffs_with_a_leading_axis_of_one(tmp_path):
  rng = np.random.default_rng(2)
  stack = rng.integers(0, 60000, (3, 16, 12), dtype=np.uint16)
  for z in range(3):
    tifffile.imwrite(tmp_path / f"ice_{z}.tif", stack[z : z + 1])  # [1, y, x]
  tifffile.imwrite(tmp_path / "lab_1.tif", np.ones((16, 12, 1), np.uint8))  # [y, x, 1]
  plan = ingest.plan_ingest({"ICE": str(tmp_path / "ice_*.tif")}, str(tmp_path / "lab_*"), "ab")
  out = str(tmp_path / "v.zarr")
  meta = ingest.ingest(plan, out, voxel_size_nm=(1, 1, 1), progress=False)
  vol = volume.open_volume(out)
  assert meta.shape == (3, 16, 12) and meta.annotated_slices == (1,)
  np.testing.assert_array_equal(vol.read_image(slice(None))[..., 0], stack)
  assert np.all(vol.read_labels(1) == 1)


def test_label_values_beyond_classes(tmp_path):
  _make_stack(str(tmp_path))
  _expect_error(
    tmp_path, r"seg_008.tif holds label values \[2\] but --classes names 2", classes=["a", "b"]
  )
  # Without --classes the names come from the values, which must fit in uint8 below 255.
  lab = np.zeros((24, 20), np.uint16)
  lab[0, :3] = (300, 254, 255)
  tifffile.imwrite(tmp_path / "labels" / "seg_011.tif", lab)
  _expect_error(tmp_path, r"seg_011.tif holds label values \[254, 300\]", classes=None)


def test_unreadable_and_empty_files(tmp_path):
  _make_stack(str(tmp_path))
  (tmp_path / "ICE" / "run2_ICE_0009.tif").write_bytes(b"not a tiff")
  _expect_error(tmp_path, r"run2_ICE_0009.tif: cannot read image")
  _make_stack(str(tmp_path))
  (tmp_path / "TLD" / "tld-9.png").write_bytes(b"")
  _expect_error(tmp_path, r"tld-9.png: cannot read image")


def test_no_match_and_no_number(tmp_path):
  _make_stack(str(tmp_path))
  with pytest.raises(ingest.IngestError, match=r"--channel=BSE: no files match"):
    ingest.plan_ingest({"BSE": str(tmp_path / "BSE" / "*.tif")}, None, None)
  tifffile.imwrite(tmp_path / "ICE" / "overview.tif", np.zeros((24, 20), np.uint16))
  _expect_error(tmp_path, r"overview.tif: no slice number in the file name")


def test_existing_output_needs_overwrite(tmp_path):
  _make_stack(str(tmp_path))
  out = str(tmp_path / "vol.zarr")
  _run(str(tmp_path), out)
  with pytest.raises(ingest.IngestError, match=r"already exists; pass --overwrite"):
    _run(str(tmp_path), out)
  volume.open_volume(out)  # the first volume is untouched


def test_interrupted_ingest_leaves_nothing(tmp_path):
  _make_stack(str(tmp_path))
  plan = ingest.plan_ingest(_channels(str(tmp_path)), None, CLASSES)

  def crash(z):
    if z == 2:
      raise KeyboardInterrupt

  with pytest.raises(KeyboardInterrupt):
    ingest.ingest(plan, str(tmp_path / "v.zarr"), voxel_size_nm=(1, 1, 1), on_slice=crash)
  assert [p for p in os.listdir(tmp_path) if "v.zarr" in p] == []


def test_script_end_to_end_and_error_message(tmp_path):
  _make_stack(str(tmp_path), numbers=(7, 8, 10, 11), labelled=(8, 11))  # slice 9 missing
  out = str(tmp_path / "vol.zarr")
  args = [
    sys.executable,
    SCRIPT,
    f"--channel=ICE={tmp_path}/ICE/*.tif",
    f"--channel=TLD={tmp_path}/TLD/*.png",
    f"--labels={tmp_path}/labels/*.tif",
    "--classes=pore,csh,portlandite",
    "--voxel_size_nm=50,25,25",
    f"--out={out}",
  ]
  gap = subprocess.run(args, **_quiet())
  assert gap.returncode == 1 and "Traceback" not in gap.stderr
  assert "slice number(s) [9] missing between" in gap.stderr
  args.append("--allow_missing_slices")
  done = subprocess.run(args, capture_output=True, text=True, check=False)
  assert done.returncode == 0, done.stderr
  assert "4 slices of 24 x 20" in done.stdout
  again = subprocess.run(args, capture_output=True, text=True, check=False)
  assert again.returncode != 0
  assert "already exists; pass --overwrite" in again.stderr
  assert "Traceback" not in again.stderr
  bad = subprocess.run(args[:-3] + ["--voxel_size_nm=50,25", f"--out={out}2"], **_quiet())
  assert bad.returncode != 0 and "--voxel_size_nm=50,25: expected 3 positive" in bad.stderr


def _quiet():
  return {"capture_output": True, "text": True, "check": False}


def test_intensity_statistics_memory_does_not_grow_with_the_stack(monkeypatch):
  monkeypatch.setattr(volume, "_STATS_SAMPLES_PER_SLICE", 256)
  monkeypatch.setattr(volume, "_STATS_MAX_SAMPLES", 1000)
  stats = volume._ChannelStats(1)
  for z in range(100):
    stats.add(np.full((32, 32, 1), z, np.uint16))  # slice z holds the value z only
    assert sum(len(s) for s in stats._samples) <= 1000
  # Every slice keeps the same weight, so the median is that of 0..99.
  assert stats.result(["ICE"])["ICE"]["p50"] == pytest.approx(49.5, abs=1)
