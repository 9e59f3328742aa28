"""OME-Zarr (NGFF 0.5) views and exports, checked with ome-zarr-models (the validator) and
ome-zarr's Reader (what napari-ome-zarr opens), plus the TIFF export."""

import json
import os
import sys

import numpy as np
import pytest
import tifffile
import zarr
from ome_zarr.io import parse_url
from ome_zarr.reader import Reader
from ome_zarr_models import open_ome_zarr
from ome_zarr_models.v05.image import Image
from ome_zarr_models.v05.image_label import ImageLabel

from fibseg_jax.data import ome, volume
from fibseg_jax.infer import export, store

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import segment_child  # noqa: E402 - tiny models shared with the other inference tests
import test_infer  # noqa: E402 - its volume maker and segment() helper

VOXEL = (50.0, 25.0, 25.0)
CLASSES = ("pore", "solid", "grain")
# Larger than ome.PYRAMID_SIDE in y, so the views get a second level.
SHAPE = (4, 300, 40)


def make_volume(root, shape=SHAPE):
  rng = np.random.default_rng(1)
  z, y, x = shape
  with volume.create_volume(
    root, shape=shape, dtype="uint16", channels=("ICE", "TLD"), classes=CLASSES,
    voxel_size_nm=VOXEL,
  ) as w:  # fmt: skip
    for k in range(z):
      labels = rng.integers(0, 3, (y, x)).astype(np.uint8) if k in (1, 2) else None
      if labels is not None:
        labels[:5] = volume.IGNORE_LABEL
      w.write_slice(k, rng.integers(0, 60000, (y, x, 2)).astype(np.uint16), labels)
    w.commit()
  return root


@pytest.fixture(scope="module")
def vol_path(tmp_path_factory):
  return make_volume(str(tmp_path_factory.mktemp("ome") / "vol.zarr"))


@pytest.fixture(scope="module")
def seg_path(vol_path):
  out = os.path.join(os.path.dirname(vol_path), "seg.zarr")
  model = segment_child.pixel_model(len(CLASSES), 2)
  test_infer.segment(volume.open_volume(vol_path), model, out, block=64)
  return out


def scales(multiscale):
  return [tuple(ds.coordinateTransformations[0].scale) for ds in multiscale.datasets]


def test_pyramid_halves_y_x_until_small_and_z_once_isotropic():
  pyr = ome.pyramid((24, 4000, 3000), VOXEL)
  assert pyr.shapes == (
    (24, 4000, 3000),
    (24, 2000, 1500),
    (12, 1000, 750),
    (6, 500, 375),
    (3, 250, 188),
  )
  assert [pyr.scale(k) for k in range(pyr.levels)] == [
    [50, 25, 25],
    [50, 50, 50],
    [100, 100, 100],
    [200, 200, 200],
    [400, 400, 400],
  ]
  assert ome.pyramid((5, 200, 200), VOXEL).levels == 1


def test_volume_view_is_valid_ngff_at_the_voxel_size(vol_path):
  image = Image.from_zarr(zarr.open_group(os.path.join(vol_path, ome.VIEW), mode="r"))
  (multiscale,) = image.ome_attributes.multiscales
  assert [(a.name, a.type, a.unit) for a in multiscale.axes] == [
    ("c", "channel", None),
    ("z", "space", "nanometer"),
    ("y", "space", "nanometer"),
    ("x", "space", "nanometer"),
  ]
  assert scales(multiscale) == [(1, 50, 25, 25), (1, 50, 50, 50)]
  assert image.labels.label_paths == [ome.ANNOTATIONS]
  labels = open_ome_zarr(os.path.join(vol_path, ome.VIEW, "labels", ome.ANNOTATIONS))
  assert isinstance(labels, ImageLabel)
  assert scales(labels.ome_attributes.multiscales[0]) == [(50, 25, 25), (50, 50, 50)]

  # The data: channels first, labels shifted by one, coarser levels from level 0.
  vol = volume.open_volume(vol_path)
  view = zarr.open_group(os.path.join(vol_path, ome.VIEW), mode="r")
  level0 = view["0"][:]
  np.testing.assert_array_equal(level0, np.moveaxis(vol.read_image(slice(None)), -1, 0))
  expected = level0[:, :, :300:2, :40:2].astype(float) + level0[:, :, 1::2, 1::2]
  expected += level0[:, :, 1::2, ::2].astype(float) + level0[:, :, ::2, 1::2]
  np.testing.assert_allclose(view["1"][:], expected / 4, atol=0.5)
  truth = vol.read_labels(slice(None))
  annotations = view[f"labels/{ome.ANNOTATIONS}/0"][:]
  np.testing.assert_array_equal(annotations[truth != 255], truth[truth != 255] + 1)
  assert not annotations[truth == 255].any()
  np.testing.assert_array_equal(view[f"labels/{ome.ANNOTATIONS}/1"][:], annotations[:, ::2, ::2])
  # The library's own arrays and metadata are untouched by the view.
  assert vol.image.shape == (*SHAPE, 2) and vol.metadata.annotated_slices == (1, 2)


def test_napari_reader_sees_image_and_labels_at_the_voxel_size(vol_path):
  nodes = list(Reader(parse_url(os.path.join(vol_path, ome.VIEW)))())
  image, labels = nodes[0], nodes[-1]
  assert image.metadata["channel_names"] == ["ICE", "TLD"]
  assert image.metadata["coordinateTransformations"][0][0]["scale"] == [1, 50, 25, 25]
  assert [d.shape for d in image.data] == [(2, *SHAPE), (2, 4, 150, 20)]
  assert labels.metadata["name"] == ome.ANNOTATIONS
  colors = ome.class_colors(3)
  assert labels.metadata["color"][1] == pytest.approx([*np.round(255 * colors[0]) / 255, 1])
  assert labels.metadata["color"][0] == [0, 0, 0, 0]  # not annotated: transparent
  assert labels.metadata["properties"][3]["class"] == "grain"


def test_segmentation_export_is_an_image_label_over_the_volume(seg_path, vol_path):
  path = export.export_segmentation(seg_path, "zarr")
  assert path == seg_path[: -len(".zarr")] + ".ome.zarr"
  model = open_ome_zarr(path)
  assert isinstance(model, ImageLabel)
  assert scales(model.ome_attributes.multiscales[0]) == [(50, 25, 25), (50, 50, 50)]
  props = {p.label_value: p.model_dump() for p in model.ome_attributes.image_label.properties}
  assert props[0]["class"] == "not segmented" and props[1]["class"] == "pore"
  seg = store.open_array(seg_path).read().result()
  np.testing.assert_array_equal(zarr.open_array(os.path.join(path, "0"))[:], seg + 1)
  # napari opens the source image under the segmentation: the link resolves.
  nodes = list(Reader(parse_url(path))())
  assert os.path.realpath(str(nodes[0].zarr.path)) == os.path.realpath(
    os.path.join(vol_path, ome.VIEW)
  )
  assert nodes[-1].metadata["coordinateTransformations"][0][0]["scale"] == [50, 25, 25]

  # Rewriting its own export is allowed; the input volume never, with or without --overwrite.
  export.export_segmentation(seg_path, "zarr")
  for overwrite in (False, True):
    with pytest.raises(store.OutputError, match="is the input --input"):
      export.export_segmentation(seg_path, "zarr", vol_path, overwrite=overwrite)


def test_tiff_export_carries_values_voxel_size_and_classes(seg_path, tmp_path):
  seg = store.open_array(seg_path).read().result()
  path = export.export_segmentation(seg_path, "tiff", str(tmp_path / "seg.tif"))
  with tifffile.TiffFile(path) as tif:
    np.testing.assert_array_equal(tif.asarray(), seg + 1)
    meta = tif.imagej_metadata
    assert meta["spacing"] == pytest.approx(0.05) and meta["unit"] == "um"
    assert "1=pore, 2=solid, 3=grain" in meta["Info"]
    assert tif.pages[0].tags["XResolution"].value == (40, 1)  # 40 pixels per um
    lut = np.reshape(meta["LUTs"], (-1, 3, 256))[0]
    assert tuple(lut[:, 1]) == tuple(np.rint(255 * ome.class_colors(3)[0]).astype(np.uint8))


def test_large_tiff_export_is_a_bigtiff_with_one_page_per_slice(seg_path, tmp_path, monkeypatch):
  monkeypatch.setattr(export, "IMAGEJ_MAX_BYTES", 0)  # as for a stack over 4 GiB
  path = export.write_tiff(seg_path, tmp_path / "big.tif")
  with tifffile.TiffFile(path) as tif:
    assert tif.is_bigtiff and len(tif.pages) == SHAPE[0]
    assert tif.pages[0].tags["XResolution"].value == (400000, 1)  # pixels per cm
    assert tif.asarray().max() <= 3


def test_add_ome_view_to_a_volume_written_without_one(tmp_path):
  root = str(tmp_path / "plain.zarr")
  with volume.create_volume(
    root, shape=(2, 20, 20), dtype="float32", channels=("ICE",), classes=("a", "b"),
    voxel_size_nm=VOXEL, ome_view=False,
  ) as w:  # fmt: skip
    w.write_slice(0, np.ones((20, 20), np.float32), np.zeros((20, 20), np.uint8))
    w.write_slice(1, np.zeros((20, 20), np.float32))
    w.commit()
  assert not os.path.exists(os.path.join(root, ome.VIEW))
  volume.add_ome_view(root)
  image = open_ome_zarr(os.path.join(root, ome.VIEW))
  assert isinstance(image, Image)
  assert volume.group_attributes(root)["ome_view"] == ome.VIEW
  omero = json.load(open(os.path.join(root, ome.VIEW, "zarr.json")))["attributes"]["ome"]["omero"]
  assert omero["channels"][0]["label"] == "ICE"


trained = test_infer.trained  # the tiny U-Net checkpoint fixture


def test_segment_script_writes_the_tiff_export_and_names_a_taken_path(trained, tmp_path):
  vol_path = make_volume(str(tmp_path / "vol.zarr"), shape=(2, 32, 32))
  workdir = trained
  out, tif = str(tmp_path / "seg.zarr"), str(tmp_path / "seg.tif")
  flags = [f"--workdir={workdir}", f"--input={vol_path}", f"--output={out}", "--tile=16"]
  proc = test_infer.run_segment(*flags, "--overlap=4", "--format=tiff")
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert f"tiff export:   {tif}" in proc.stdout
  assert tifffile.imread(tif).shape == (2, 32, 32)

  taken = str(tmp_path / "taken.ome.zarr")
  os.makedirs(taken)
  with open(os.path.join(taken, "notes.txt"), "w") as f:
    f.write("not ours")
  for extra in ([], ["--overwrite"]):
    proc = test_infer.run_segment(*flags, "--format=zarr", f"--export={taken}", *extra)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert (
      proc.stderr.strip()
      .splitlines()[-1]
      .startswith(
        f"error: --export={taken} exists and is a directory that is not a fibseg zarr export"
      )
    )
  assert os.listdir(taken) == ["notes.txt"]
