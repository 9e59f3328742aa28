"""Tests for the synthetic cement-paste FIB-SEM stack generator and its CLI."""

import json
import os
import subprocess
import sys

import imageio.v3 as iio
import numpy as np
import pytest
import tifffile
from scipy import ndimage

from fibseg_jax.data import ingest, synth, volume

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# 6 slices of 96 x 96 at 50 nm: a 4.8 um field, wide enough that seed 0 has every phase on
# every slice, small enough that one stack takes a few tens of milliseconds.
SMALL = dict(shape=(6, 96, 96), voxel_size_nm=(100.0, 50.0, 50.0), seed=0)
ALL_OFF = dict(curtaining=0.0, shading=0.0, noise=0.0, shine_through=0.0)
# Upper bound on the within-phase std of a clean stack, as a fraction of the detector range.
# With every artifact off, the spread inside a phase is only its intrinsic texture, whose
# largest amplitude is 0.02 (`TEXTURE_AMPLITUDE`); phase interiors (eroded by 2 px) leave
# out the beam-blurred edges. At 0.025 the closest pair in any single detector (0.06 apart)
# stays more than 2 std apart, i.e. a clean stack is segmentable by thresholds.
CLEAN_SPREAD_BOUND = 0.025


def _stack(**overrides) -> synth.SynthStack:
  return synth.generate(synth.SynthConfig(**{**SMALL, **overrides}))


def _signal(stack: synth.SynthStack) -> np.ndarray:
  """Counts back to detector signal (fraction of range): [z, y, x, channel] float32."""
  return (stack.image.astype(np.float32) - synth.DETECTOR_OFFSET) / synth.DETECTOR_GAIN


def _interiors(labels: np.ndarray) -> list[np.ndarray]:
  """Per class, [z, y, x] mask of voxels at least 2 px (in y, x) from another phase."""
  return [
    ndimage.binary_erosion(labels == k, structure=np.ones((1, 5, 5)))
    for k in range(len(synth.CLASSES))
  ]


@pytest.fixture(scope="module")
def clean():
  return _stack(**ALL_OFF)


def test_config_rejects_bad_values():
  with pytest.raises(ValueError, match="shape"):
    synth.SynthConfig(shape=(0, 96, 96))
  with pytest.raises(ValueError, match="shape"):
    synth.SynthConfig(shape=(4, 96))
  with pytest.raises(ValueError, match="voxel_size_nm"):
    synth.SynthConfig(voxel_size_nm=(50, -25, 25))
  with pytest.raises(ValueError, match="curtaining"):
    synth.SynthConfig(curtaining=-1)
  with pytest.raises(ValueError, match="shine_through"):
    synth.SynthConfig(shine_through=float("nan"))


def test_generate_is_deterministic_per_seed(clean):
  a, b = _stack(), _stack()
  assert a.image.dtype == np.uint16 and a.image.shape == (6, 96, 96, 2)
  assert a.labels.dtype == np.uint8 and a.labels.shape == (6, 96, 96)
  np.testing.assert_array_equal(a.image, b.image)
  np.testing.assert_array_equal(a.labels, b.labels)
  other = _stack(seed=1)
  assert np.mean(other.labels != a.labels) > 0.2
  assert np.mean(other.image != a.image) > 0.5
  # Severities change the imaging, never the sample.
  np.testing.assert_array_equal(clean.labels, a.labels)


def test_counts_lie_in_a_realistic_subrange():
  image = _stack().image
  for c in range(2):
    lo, hi = np.percentile(image[..., c], (0.5, 99.5))
    assert 500 < lo < 5000, (c, lo)
    assert 10_000 < hi < 35_000, (c, hi)


def test_every_phase_on_every_slice_in_balanced_fractions():
  # One 512 x 512 field at the default 25 nm, two slices 50 nm apart.
  labels = synth.phantom_labels((2, 512, 512), (50.0, 25.0, 25.0), seed=3)
  for z in range(2):
    fractions = np.bincount(labels[z].ravel(), minlength=4) / labels[z].size
    pore, csh, portlandite, clinker = fractions
    assert 0.05 <= pore <= 0.15, fractions
    assert 0.08 <= portlandite <= 0.22, fractions
    assert 0.08 <= clinker <= 0.25, fractions
    assert csh >= 0.4, fractions
  # Features are sized in nm (grains ~1 um), so slices 50 nm apart mostly agree.
  assert np.mean(labels[0] == labels[1]) > 0.8


def test_clean_stack_has_small_within_phase_spread(clean):
  # With artifacts off: spread under the bound, and phase means where the detector
  # model puts them (checks the offset/gain mapping to counts).
  sig = _signal(clean)
  noisy = _signal(_stack())
  for k, inside in enumerate(_interiors(clean.labels)):
    assert inside.sum() > 500, f"test stack lacks interior {synth.CLASSES[k]} voxels"
    spread = sig[inside].std(0)
    assert np.all(spread < CLEAN_SPREAD_BOUND), (synth.CLASSES[k], spread)
    np.testing.assert_allclose(sig[inside].mean(0), synth.PHASE_SIGNAL[k], atol=0.015)
    # Every artifact at severity 1 pushes the (noisier) ICE spread well past the bound.
    assert noisy[inside].std(0)[0] > 2 * CLEAN_SPREAD_BOUND, synth.CLASSES[k]


def test_curtaining_severity_one_gives_visible_vertical_streaks(clean):
  curtained = _stack(**{**ALL_OFF, "curtaining": 1.0})
  change = _signal(curtained) - _signal(clean)  # what curtaining adds, same sample
  column_std = change.mean(axis=1).std(axis=1)  # [z, channel]: spread of column means
  row_std = change.mean(axis=2).std(axis=1)
  # 0.01 of the detector range (~200 counts) over whole columns is a plainly visible
  # streak; streaks run along y, so column means vary far more than row means.
  assert np.all(column_std > 0.01), column_std
  assert np.all(column_std > 3 * row_std), (column_std, row_std)
  # The streaks drift slowly: neighbouring slices' curtains agree more than far ones.
  profile = change[..., 1].mean(axis=1)
  near = np.corrcoef(profile[0], profile[1])[0, 1]
  assert near > 0.5, near


def test_shading_grows_with_trench_depth(clean):
  shaded = _signal(_stack(**{**ALL_OFF, "shading": 1.0}))
  sig = _signal(clean)
  bright = sig > 0.3  # a ratio is only meaningful away from the pore floor
  for c in range(2):
    loss = [
      1 - np.mean(shaded[z, ..., c][bright[z, ..., c]] / sig[z, ..., c][bright[z, ..., c]])
      for z in range(6)
    ]
    assert loss[0] > 0.03, loss
    assert np.all(np.diff(loss) > 0.005), loss
  # The ICE occlusion shadow comes from the trench wall at x = 0.
  ratio = shaded[-1, ..., 0] / np.maximum(sig[-1, ..., 0], 1e-3)
  left, right = ratio[:, :10][bright[-1, :, :10, 0]], ratio[:, -10:][bright[-1, :, -10:, 0]]
  assert left.mean() < right.mean() - 0.2


def test_shine_through_changes_only_pore_pixels(clean):
  base = _stack(**{**ALL_OFF, "curtaining": 1.0, "shading": 1.0})
  shine = _stack(**{**ALL_OFF, "curtaining": 1.0, "shading": 1.0, "shine_through": 1.0})
  pore = base.labels == synth.PORE
  changed = np.any(base.image != shine.image, axis=-1)
  assert not np.any(changed & ~pore)
  assert changed[pore].mean() > 0.3
  # Material is brighter than pore in both detectors, so pores only ever brighten.
  assert np.all(shine.image >= base.image)
  # Pores with material right behind them (next slice) show more than deep pores.
  sig = _signal(_stack(**{**ALL_OFF, "shine_through": 1.0})) - _signal(clean)
  labels = clean.labels
  shallow = pore[:-2] & (labels[1:-1] != synth.PORE)
  deep = pore[:-2] & (labels[1:-1] == synth.PORE) & (labels[2:] == synth.PORE)
  assert shallow.sum() > 100 and deep.sum() > 100
  assert sig[:-2][shallow].mean() > 0.05
  assert sig[:-2][shallow].mean() > 2 * sig[:-2][deep].mean()


def test_neither_detector_alone_separates_every_phase(clean):
  # Nearest phase mean under noise, on phase interiors: each detector alone confuses a
  # pair (ICE: C-S-H/portlandite, TLD: portlandite/clinker); both together do not.
  sig = _signal(_stack(**{**ALL_OFF, "noise": 1.0}))

  def worst_class_accuracy(channels):
    dist = ((sig[..., None, channels] - synth.PHASE_SIGNAL[:, channels]) ** 2).sum(-1)
    pred = dist.argmin(-1)
    return min((pred[m] == k).mean() for k, m in enumerate(_interiors(clean.labels)))

  assert worst_class_accuracy([0]) < 0.8
  assert worst_class_accuracy([1]) < 0.8
  assert worst_class_accuracy([0, 1]) > 0.85


def test_write_tiff_folders_writes_labels_only_for_annotated_slices(tmp_path):
  stack = _stack()
  out = synth.write_tiff_folders(stack, tmp_path / "run", annotate=[4, 1, 4])
  assert sorted(os.listdir(out)) == ["ICE", "TLD", "labels", "stack.json"]
  expected = [f"slice_{z:04d}.tif" for z in range(6)]
  for c, name in enumerate(synth.CHANNELS):
    assert sorted(os.listdir(os.path.join(out, name))) == expected
    for z in (0, 5):
      page = tifffile.imread(os.path.join(out, name, expected[z]))
      assert page.dtype == np.uint16
      np.testing.assert_array_equal(page, stack.image[z, :, :, c])
  assert sorted(os.listdir(os.path.join(out, "labels"))) == ["slice_0001.tif", "slice_0004.tif"]
  np.testing.assert_array_equal(
    tifffile.imread(os.path.join(out, "labels", "slice_0004.tif")), stack.labels[4]
  )
  with open(os.path.join(out, "stack.json")) as f:
    info = json.load(f)
  assert info["classes"] == list(synth.CLASSES)
  assert info["annotated_slices"] == [1, 4]
  assert info["voxel_size_nm"] == [100.0, 50.0, 50.0]
  with pytest.raises(ValueError, match="--overwrite"):
    synth.write_tiff_folders(stack, out, annotate=[1])
  with pytest.raises(ValueError, match=r"annotate.*0\.\.5"):
    synth.write_tiff_folders(stack, tmp_path / "bad", annotate=[6])
  # Failures leave neither the destination nor a partial temporary folder.
  assert sorted(os.listdir(tmp_path)) == ["run"]
  synth.write_tiff_folders(stack, out, annotate=[2], overwrite=True)
  assert os.listdir(os.path.join(out, "labels")) == ["slice_0002.tif"]


def test_tiff_folders_ingest_to_the_same_volume_as_write_volume(tmp_path):
  # The instrument-like TIFFs carry everything: ingesting them gives the direct volume.
  stack = _stack()
  out = synth.write_tiff_folders(stack, tmp_path / "run", annotate=[0, 5])
  plan = ingest.plan_ingest(
    {name: os.path.join(out, name, "*.tif") for name in synth.CHANNELS},
    os.path.join(out, "labels", "*.tif"),
    synth.CLASSES,
  )
  ingested = ingest.ingest(
    plan, str(tmp_path / "ingested.zarr"), voxel_size_nm=stack.voxel_size_nm, progress=False
  )
  direct = synth.write_volume(stack, str(tmp_path / "direct.zarr"), annotate=[0, 5])
  assert ingested.annotated_slices == direct.annotated_slices == (0, 5)
  assert ingested.channel_stats == direct.channel_stats
  a, b = (
    volume.open_volume(tmp_path / "ingested.zarr"),
    volume.open_volume(tmp_path / "direct.zarr"),
  )
  np.testing.assert_array_equal(a.read_image(slice(None)), b.read_image(slice(None)))
  np.testing.assert_array_equal(a.read_labels(slice(None)), b.read_labels(slice(None)))


def test_write_volume_stores_labels_only_for_annotated_slices():
  stack = _stack()
  meta = synth.write_volume(stack, "memory://synth_test_volume", annotate=[3, 1])
  assert meta.annotated_slices == (1, 3)
  vol = volume.open_volume("memory://synth_test_volume")
  assert vol.channels == synth.CHANNELS and vol.classes == synth.CLASSES
  assert vol.metadata.voxel_size_nm == (100.0, 50.0, 50.0)
  np.testing.assert_array_equal(vol.read_image(slice(None)), stack.image)
  np.testing.assert_array_equal(vol.read_labels(3), stack.labels[3])
  assert np.all(vol.read_labels(2) == volume.IGNORE_LABEL)
  # Stored stats see the offset, so normalisation does not assume 0..65535.
  offset, _ = vol.normalization(["ICE"])
  assert 3000 < offset[0] < 20_000


def test_save_preview_draws_both_detectors_and_truth(tmp_path):
  stack = _stack()
  path = tmp_path / "preview.png"
  synth.save_preview(stack, 2, path)
  rgb = iio.imread(path)[..., :3].astype(int)
  assert rgb.shape[1] > 2 * rgb.shape[0]
  # The truth panel is painted in the class colours, e.g. clinker orange.
  clinker = np.round(np.array(synth.CLASS_COLORS[synth.CLINKER]) * 255)
  assert np.sum(np.abs(rgb - clinker).max(-1) <= 2) > 100
  with pytest.raises(ValueError, match="preview slice 6"):
    synth.save_preview(stack, 6, tmp_path / "x.png")


def _run_cli(*args: str) -> subprocess.CompletedProcess:
  return subprocess.run(
    [sys.executable, os.path.join(REPO, "experiments", "make_synthetic.py"), *args],
    capture_output=True,
    text=True,
    timeout=120,
  )


def test_cli_writes_tiff_and_zarr(tmp_path):
  common = ["--shape=3,48,40", "--voxel_size_nm=100,50,50", "--annotate=2,0", "--seed=1"]
  tiff = tmp_path / "tiff"
  done = _run_cli(f"--out={tiff}", *common)
  assert done.returncode == 0, done.stderr
  assert sorted(os.listdir(tiff)) == ["ICE", "TLD", "labels", "preview.png", "stack.json"]
  assert sorted(os.listdir(tiff / "labels")) == ["slice_0000.tif", "slice_0002.tif"]
  assert tifffile.imread(tiff / "TLD" / "slice_0001.tif").shape == (48, 40)
  assert f"wrote {tiff}" in done.stdout

  zarr = tmp_path / "vol.zarr"
  done = _run_cli(f"--out={zarr}", "--format=zarr", "--noise=0", *common)
  assert done.returncode == 0, done.stderr
  vol = volume.open_volume(str(zarr))
  assert vol.shape == (3, 48, 40) and vol.metadata.annotated_slices == (0, 2)
  assert os.path.isfile(f"{zarr}.preview.png")
  # Same seed and sample in both formats; only the noise differs.
  np.testing.assert_array_equal(
    vol.read_labels(2), tifffile.imread(tiff / "labels" / "slice_0002.tif")
  )

  # User mistakes: one line naming the flag and what is expected, nothing written.
  done = _run_cli(f"--out={tiff}", *common)
  assert done.returncode != 0 and "--out" in done.stderr and "--overwrite" in done.stderr
  done = _run_cli(f"--out={tmp_path / 'bad'}", "--shape=3,48,40", "--annotate=1,3")
  assert done.returncode != 0
  assert done.stderr.strip().startswith("error: --annotate") and "0..2" in done.stderr
  assert len(done.stderr.strip().splitlines()) == 1
  done = _run_cli(f"--out={tmp_path / 'bad'}", "--shape=3,48")
  assert done.returncode != 0 and "error: --shape=3,48" in done.stderr
  assert sorted(os.listdir(tmp_path)) == ["tiff", "vol.zarr", "vol.zarr.preview.png"]
