"""Whole-volume segmentation: tiling, blending, coverage, resume, processes, devices, memory."""

import dataclasses
import json
import os
import re
import subprocess
import sys
import uuid

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tensorstore as ts
import zarr

from fibseg_jax import infer
from fibseg_jax.data import volume
from fibseg_jax.infer import predict, store, tiling

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import segment_child  # noqa: E402 - the tiny models shared with the subprocess tests

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CHILD = os.path.join(REPO, "tests", "segment_child.py")
SEGMENT = os.path.join(REPO, "experiments", "segment.py")
CLASSES = ("pore", "solid", "grain")
CHANNELS = ("ICE", "TLD")
# Not multiples of the tile (16) or block (32) on any axis.
SHAPE = (5, 70, 45)


def make_volume(root, shape=SHAPE, channels=CHANNELS, seed=0):
  rng = np.random.default_rng(seed)
  z, y, x = shape
  yy, xx = np.mgrid[:y, :x]
  with volume.create_volume(
    root,
    shape=shape,
    dtype="uint16",
    channels=channels,
    classes=CLASSES,
    voxel_size_nm=(50, 25, 25),
    overwrite=True,
  ) as w:
    for k in range(z):
      smooth = [np.sin(xx / (5 + c) + k) + np.cos(yy / (4 + c) - k) for c in range(len(channels))]
      image = 3000 + 1000 * np.stack(smooth, -1) + rng.normal(0, 200, (y, x, len(channels)))
      w.write_slice(k, image.clip(0, 65535).astype(np.uint16))
    w.commit()
  return root


def memory_root(name):
  return f"memory://{name}-{uuid.uuid4().hex[:8]}"


@pytest.fixture(scope="module")
def vol():
  return volume.open_volume(make_volume(memory_root("vol")))


@pytest.fixture(scope="module")
def pixel():
  return segment_child.pixel_model(3, len(CHANNELS))


def whole_image_probabilities(apply, variables, vol, z, *, slices=3, pad=0, multiple=1):
  """The model on the whole slice at once: the reference that tiling must reproduce.

  The slice is reflect-padded by `pad` (and up to a multiple of `multiple`) as the tiled
  runner pads the volume border. `apply(variables, x)` gives logits. Returns
  [y, x, classes] float32.
  """
  depth, y, x = vol.shape
  ey = tiling.round_up(y + 2 * pad, multiple) - y - pad
  ex = tiling.round_up(x + 2 * pad, multiple) - x - pad
  zs = tiling.slab_indices(z, slices, depth)
  ys = tiling.reflect_indices(-pad, y + ey, y)
  xs = tiling.reflect_indices(-pad, x + ex, x)
  image = vol.read_image(slice(None)).astype(np.float32)[zs][:, ys][:, :, xs]
  offset, scale = vol.normalization(CHANNELS)
  logits = apply(variables, jnp.asarray((image - offset) * scale)[None])
  probs = np.asarray(jax.nn.softmax(logits, -1))[0]
  return probs[pad : pad + y, pad : pad + x]


def segment(vol, model_and_vars, output, **kwargs):
  """`segment_volume` with small defaults; `SegmentSettings` fields go to its settings."""
  model, variables = model_and_vars
  fields = {f.name for f in dataclasses.fields(infer.SegmentSettings)}
  given = dict(tile=16, overlap=4, block=32, batch=3, progress=False)
  given.update({k: v for k, v in kwargs.items() if k in fields})
  rest = dict(channels=CHANNELS, slices=3)
  rest.update({k: v for k, v in kwargs.items() if k not in fields})
  settings = infer.SegmentSettings(**given)
  return infer.segment_volume(vol, model, variables, output=output, settings=settings, **rest)


def read(path):
  return infer.open_array(path).read().result()


# --- geometry -------------------------------------------------------------------------


@pytest.mark.parametrize("size", [1, 2, 3, 7])
def test_reflect_indices_match_numpy_pad(size):
  values = np.arange(size)
  expected = np.pad(values, 9, mode="reflect")
  np.testing.assert_array_equal(tiling.reflect_indices(-9, size + 9, size), expected)


def test_slab_indices_reflect_at_stack_ends():
  np.testing.assert_array_equal(tiling.slab_indices(0, 3, 5), [1, 0, 1])
  np.testing.assert_array_equal(tiling.slab_indices(4, 5, 5), [2, 3, 4, 3, 2])
  np.testing.assert_array_equal(tiling.slab_indices(2, 3, 5), [1, 2, 3])
  np.testing.assert_array_equal(tiling.slab_indices(0, 3, 1), [0, 0, 0])


@pytest.mark.parametrize("size,tile,overlap", [(70, 16, 4), (45, 16, 0), (33, 32, 8), (16, 16, 4)])
def test_tiles_cover_every_pixel_with_the_overlap(size, tile, overlap):
  starts = tiling.tile_starts(size, tile, overlap)
  cover = np.zeros(size, int)
  for s in starts:
    cover[s : s + tile] += 1
  assert cover.min() >= 1 and starts[-1] + tile == size and starts[0] == 0
  gaps = [a + tile - b for a, b in zip(starts, starts[1:], strict=False)]
  assert all(g >= overlap for g in gaps)


@pytest.mark.parametrize("kind", ["cosine", "gaussian"])
def test_window_is_positive_everywhere(kind):
  w = tiling.blend_window((16, 24), 4, kind)
  assert w.shape == (16, 24)
  assert w.min() > 0 and np.isclose(w.max(), 1.0)


def test_cosine_windows_of_neighbours_sum_to_one():
  w = tiling.window_1d(16, 4, "cosine")
  total = np.zeros(28)
  total[:16] += w
  total[12:] += w
  np.testing.assert_allclose(total[4:24], 1.0, atol=1e-6)


def test_blocks_partition_the_volume_and_processes_split_them():
  shape = (3, 70, 45)
  blocks = tiling.plan_blocks(shape, 32)
  count = np.zeros(shape, int)
  for b in blocks:
    count[b.z, b.y0 : b.y1, b.x0 : b.x1] += 1
  np.testing.assert_array_equal(count, 1)
  assert len({b.key for b in blocks}) == len(blocks)
  for n in (1, 2, 3, 7):
    shares = [tiling.assign_blocks(blocks, i, n) for i in range(n)]
    assert sorted(b.key for s in shares for b in s) == sorted(b.key for b in blocks)


def test_tile_must_fit_the_model():
  with pytest.raises(infer.InferenceError, match=r"--tile=30 is not a multiple of 16.*16 or 32"):
    tiling.check_tiling(30, 4, 16)
  with pytest.raises(infer.InferenceError, match=r"--overlap=32 must be in \[0, --tile=32\)"):
    tiling.check_tiling(32, 32, 16)


def test_small_region_is_padded_to_a_valid_size():
  block = tiling.Block(0, 0, 5, 0, 9)
  geom = tiling.region_geometry(block, (5, 9), halo=2, tile=64, size_multiple=8)
  assert geom.tile_yx == (16, 16) and geom.shape == (16, 16)
  assert geom.y_index.max() < 5 and geom.x_index.max() < 9
  np.testing.assert_array_equal(geom.y_index[:4], [2, 1, 0, 1])


@pytest.mark.parametrize(
  ("length", "tile", "min_tile", "fitted", "tiles"),
  [
    (2176, 512, 0, 496, 5),  # 5 tiles of 512 are needed; 5 of 496 cover it
    (3996, 768, 0, 720, 6),  # the paper slice's y with the defaults
    (2176, 512, 512, 512, 5),  # not below the training patch of a per-tile-norm model
    (300, 512, 0, 304, 1),  # one tile: the region rounded up to the size multiple
    (1000, 64, 0, 64, 18),  # as large as --tile when that fits best
  ],
)
def test_tiles_are_fitted_to_the_region(length, tile, min_tile, fitted, tiles):
  assert tiling.fitted_tile(length, tile, 64 if tile > 64 else 8, 16, min_tile) == fitted
  overlap = 64 if tile > 64 else 8
  starts = tiling.tile_starts(length, fitted, overlap) if fitted < length else [0]
  assert len(starts) == tiles
  assert len(tiling.tile_starts(length, tile, overlap) if tile < length else [0]) == tiles
  if tiles > 1:  # neighbours overlap by at least --overlap, and the last ends at the border
    assert min(b - a for a, b in zip(starts, starts[1:], strict=False)) <= fitted - overlap
    assert starts[-1] + fitted == length


def test_segment_script_names_a_bad_tta(tmp_path):
  proc = run_segment(
    f"--workdir={tmp_path}", "--input=v.zarr", "--output=s.zarr", "--tta=3", "--format=none"
  )
  assert proc.returncode != 0
  assert proc.stderr.strip().splitlines()[-1] == (
    "error: --tta=3: expected one of off, 1, 2, 4, 8, all, auto"
  )


def test_small_batches_are_padded_to_few_shapes(pixel):
  predictor = infer.TilePredictor(*pixel, offset=[0, 0], scale=[1, 1], overlap=4, batch=6)
  assert predictor.batch == 6
  assert [predictor.padded_size(n) for n in (1, 2, 3, 5, 6)] == [1, 2, 4, 6, 6]
  out = predictor(np.ones((3, 3, 16, 16, 2), np.uint16))
  assert out.shape == (4, 16, 16, 3)
  # Softmax times the window: the class probabilities of a pixel sum to its weight.
  np.testing.assert_allclose(np.asarray(out).sum(-1)[0], predictor.window((16, 16)), rtol=1e-5)


# --- segmentation ---------------------------------------------------------------------


@pytest.mark.parametrize("window", ["cosine", "gaussian"])
def test_tiled_labels_equal_whole_image_labels(vol, pixel, window):
  """A per-pixel model: tiles cannot matter, so every label must equal the reference."""
  out, probs = memory_root("seg"), memory_root("probs")
  result = segment(vol, pixel, out, probabilities=probs, window=window)
  assert result.complete and result.blocks_done == result.blocks_total == 5 * 3 * 2
  labels, p8 = read(out), read(probs)
  assert labels.shape == SHAPE and p8.shape == (*SHAPE, 3)
  for z in range(SHAPE[0]):
    ref = whole_image_probabilities(pixel[0].apply, pixel[1], vol, z)
    # Every voxel, the last row, column and slice included, is written and right.
    np.testing.assert_array_equal(labels[z], ref.argmax(-1))
    assert np.abs(p8[z].astype(int) - np.rint(ref * 255)).max() <= 1


def test_output_is_a_zarr_array_that_names_its_classes(vol, pixel, tmp_path):
  out = str(tmp_path / "seg.zarr")
  segment(vol, pixel, out)
  with open(os.path.join(out, "zarr.json")) as f:
    meta = json.load(f)
  assert meta["node_type"] == "array" and meta["shape"] == list(SHAPE)
  arr = zarr.open_array(out, mode="r")
  assert arr.dtype == np.uint8 and arr.chunks == (1, 32, 32)
  assert arr.attrs["classes"] == list(CLASSES)
  run = arr.attrs["fibseg_segmentation"]["run"]
  assert run["source"] == vol.root and run["channels"] == list(CHANNELS)
  assert set(np.unique(arr[:])) <= {0, 1, 2}


def test_two_processes_each_write_their_own_blocks(vol, pixel):
  out = memory_root("seg")
  reference = memory_root("ref")
  segment(vol, pixel, reference)
  first = segment(vol, pixel, out, process_index=0, process_count=2)
  assert not first.complete and first.blocks_done == first.blocks_total // 2
  labels = read(out)
  mine = tiling.assign_blocks(tiling.plan_blocks(SHAPE, 32), 0, 2)
  written = np.zeros(SHAPE, bool)
  for b in mine:
    written[b.z, b.y0 : b.y1, b.x0 : b.x1] = True
  assert np.all(labels[written] != 255) and np.all(labels[~written] == 255)
  second = segment(vol, pixel, out, process_index=1, process_count=2)
  assert second.complete and second.blocks_skipped == 0
  assert first.blocks_done + second.blocks_done == first.blocks_total
  np.testing.assert_array_equal(read(out), read(reference))


def lose_blocks(out, lost, *companions):
  """An interruption: `lost` blocks never got their data written nor their marker."""
  kv = ts.KvStore.open(volume.kvstore_spec(out), context=volume.CONTEXT).result()
  for path in (out, *companions):
    arr = infer.open_array(path)
    for b in lost:
      region = arr[b.z, b.y0 : b.y1, b.x0 : b.x1]
      region.write(np.full(region.shape, 255, np.uint8)).result()
  for b in lost:
    key = store.DONE_PREFIX + b.key
    kv.delete_range(ts.KvStore.KeyRange(key, key + "\0")).result()


def test_rerun_after_interruption_redoes_only_unfinished_blocks(vol, pixel):
  out = memory_root("seg")
  segment(vol, pixel, out)
  reference = read(out)
  lose_blocks(out, tiling.plan_blocks(SHAPE, 32)[4:7])
  assert np.count_nonzero(read(out) == 255) > 0
  result = segment(vol, pixel, out)
  assert result.blocks_done == 3 and result.blocks_skipped == result.blocks_total - 3
  assert result.complete
  np.testing.assert_array_equal(read(out), reference)


def test_existing_outputs(vol, pixel, tmp_path):
  out = memory_root("seg")
  segment(vol, pixel, out)
  with pytest.raises(store.OutputError, match="exists and is complete; pass --overwrite"):
    segment(vol, pixel, out)
  with pytest.raises(store.OutputError, match=r"different run \(tile: 16 != 32"):
    segment(vol, pixel, out, tile=32)
  again = segment(vol, pixel, out, overwrite=True, tile=32)
  assert again.blocks_done == again.blocks_total
  with pytest.raises(store.OutputError, match="is the input volume"):
    segment(vol, pixel, vol.root)
  other = make_volume(str(tmp_path / "other.zarr"), shape=(1, 8, 8))
  with pytest.raises(store.OutputError, match="zarr group"):
    segment(vol, pixel, other, overwrite=True)
  (tmp_path / "notes").mkdir()
  (tmp_path / "notes" / "a.txt").write_text("x")
  with pytest.raises(store.OutputError, match="not a zarr array"):
    segment(vol, pixel, str(tmp_path / "notes"))
  with pytest.raises(store.OutputError, match="parent directory"):
    segment(vol, pixel, str(tmp_path / "missing" / "seg.zarr"))


# --- uncertainty ----------------------------------------------------------------------


def test_uncertainty_is_the_entropy_of_the_probabilities(vol, pixel):
  out, probs, unc = memory_root("seg"), memory_root("probs"), memory_root("unc")
  result = segment(vol, pixel, out, probabilities=probs, uncertainty=unc)
  assert result.complete and result.uncertainty == unc
  u8, p8 = read(unc), read(probs)
  assert u8.shape == SHAPE and u8.dtype == np.uint8
  # From the probabilities written in the same run (those are rounded, the uncertainty
  # is computed before rounding): within 1 of 255.
  from_probs = np.rint(255 * infer.normalised_entropy(p8.astype(np.float32) / 255))
  assert np.abs(u8.astype(int) - from_probs).max() <= 1
  assert u8.min() < u8.max()  # not a constant: the test can fail
  for z in range(SHAPE[0]):
    ref = whole_image_probabilities(pixel[0].apply, pixel[1], vol, z)
    assert np.abs(u8[z].astype(int) - np.rint(255 * infer.normalised_entropy(ref))).max() <= 1
  attrs = infer.read_attributes(unc)
  info = attrs[store.ATTRIBUTE]
  assert info["kind"] == "uncertainty" and attrs["classes"] == list(CLASSES)
  assert info["definition"] == "round(255 * entropy / log(classes))"
  assert info["labels"] == out and info["run"]["uncertainty"] is True
  labels_info = infer.read_attributes(out)[store.ATTRIBUTE]
  assert labels_info["uncertainty"] == unc and labels_info["probabilities"] == probs


def test_normalised_entropy():
  p = np.array([[1.0, 0.0, 0.0], [1 / 3, 1 / 3, 1 / 3], [0.5, 0.5, 0.0]], np.float32)
  np.testing.assert_allclose(infer.normalised_entropy(p), [0, 1, np.log(2) / np.log(3)], atol=1e-6)
  assert infer.normalised_entropy(np.ones((4, 1), np.float32)).tolist() == [0, 0, 0, 0]


def test_rerun_after_interruption_keeps_the_uncertainty_consistent(vol, pixel):
  ref_out, ref_unc = memory_root("ref"), memory_root("refu")
  segment(vol, pixel, ref_out, uncertainty=ref_unc)
  out, probs, unc = memory_root("seg"), memory_root("probs"), memory_root("unc")
  segment(vol, pixel, out, probabilities=probs, uncertainty=unc)
  lose_blocks(out, tiling.plan_blocks(SHAPE, 32)[4:9], probs, unc)
  assert np.count_nonzero(read(unc) == 255) > 0
  result = segment(vol, pixel, out, probabilities=probs, uncertainty=unc)
  assert result.blocks_done == 5 and result.complete
  np.testing.assert_array_equal(read(unc), read(ref_unc))
  np.testing.assert_array_equal(read(out), read(ref_out))
  from_probs = np.rint(255 * infer.normalised_entropy(read(probs).astype(np.float32) / 255))
  assert np.abs(read(unc).astype(int) - from_probs).max() <= 1


def test_uncertainty_outputs_follow_the_probabilities_rules(vol, pixel):
  # Asked for on a finished output that lacks it: refused, as --probabilities is.
  out, probs, unc = memory_root("seg"), memory_root("probs"), memory_root("unc")
  segment(vol, pixel, out)
  for flag, kwargs in (("probabilities", {"probabilities": probs}), ("uncertainty", {})):
    kwargs = kwargs or {"uncertainty": unc}
    with pytest.raises(
      store.OutputError,
      match=rf"--output={out} exists and belongs to a different run \({flag}: .*\); it was "
      rf"written without --{flag}; pass --overwrite",
    ):
      segment(vol, pixel, out, **kwargs)
  # A run with it, rerun without it: also a different run.
  out2, unc2 = memory_root("seg"), memory_root("unc")
  segment(vol, pixel, out2, uncertainty=unc2, process_index=0, process_count=2)
  with pytest.raises(store.OutputError, match="it was written with --uncertainty"):
    segment(vol, pixel, out2, process_index=1, process_count=2)
  # Its array gone while the labels have finished blocks; there without the labels.
  kv = ts.KvStore.open(volume.kvstore_spec(unc2), context=volume.CONTEXT).result()
  kv.delete_range(ts.KvStore.KeyRange()).result()
  with pytest.raises(store.OutputError, match=rf"--uncertainty={unc2} is missing but --output"):
    segment(vol, pixel, out2, uncertainty=unc2, process_index=1, process_count=2)
  segment(vol, pixel, memory_root("seg"), uncertainty=unc)
  with pytest.raises(store.OutputError, match=rf"--uncertainty={unc} exists; pass --overwrite"):
    segment(vol, pixel, memory_root("seg"), uncertainty=unc)
  # Paths: every array its own, and --overwrite replaces it.
  with pytest.raises(
    store.OutputError,
    match=r"--uncertainty=.* must differ from --output, --input and "
    r"--probabilities",
  ):
    segment(vol, pixel, memory_root("seg"), probabilities=probs, uncertainty=probs)
  with pytest.raises(store.OutputError, match=r"--uncertainty=.* must differ from --output and"):
    segment(vol, pixel, out, uncertainty=out)
  group = make_volume(memory_root("other"), shape=(1, 8, 8))
  with pytest.raises(store.OutputError, match="--uncertainty=.* is a zarr group"):
    segment(vol, pixel, memory_root("seg"), uncertainty=group, overwrite=True)
  again = segment(vol, pixel, out, uncertainty=unc, overwrite=True)
  assert again.complete and read(unc).shape == SHAPE


def test_only_slices_segments_those_slices(vol, pixel):
  full = memory_root("full")
  segment(vol, pixel, full)
  out, unc = memory_root("seg"), memory_root("unc")
  result = segment(vol, pixel, out, uncertainty=unc, only_slices=[3, 1])
  assert result.complete and result.blocks_total == result.blocks_done == 2 * 3 * 2
  assert infer.read_attributes(out)[store.ATTRIBUTE]["run"]["only_slices"] == [1, 3]
  labels, reference = read(out), read(full)
  np.testing.assert_array_equal(labels[[1, 3]], reference[[1, 3]])
  # The others were never written: they read as the fill value, not segmented.
  for array in (labels, read(unc)):
    assert np.all(array[[0, 2, 4]] == store.NOT_SEGMENTED)
  assert np.all(labels[[1, 3]] < len(CLASSES))
  with pytest.raises(store.OutputError, match="exists and is complete"):
    segment(vol, pixel, out, uncertainty=unc, only_slices=[1, 3])
  # Other slices, or the whole stack, into the same output is another run.
  for other in ([1, 2], None):
    with pytest.raises(store.OutputError, match=r"different run \(only_slices: \[1, 3\]"):
      segment(vol, pixel, out, uncertainty=unc, only_slices=other)
  with pytest.raises(
    store.OutputError, match=r"tta: None != True\); it was written with --tta=off"
  ):
    segment(vol, pixel, out, uncertainty=unc, only_slices=[1, 3], tta=True)
  with pytest.raises(infer.InferenceError, match=r"--slices=1,5: expected slices within 0..4"):
    segment(vol, pixel, memory_root("seg"), only_slices=[1, 5])


def test_user_mistakes_are_named(vol, pixel):
  out = memory_root("seg")
  with pytest.raises(volume.VolumeError, match=r"channel\(s\) \['BSE'\] not in volume"):
    segment(vol, pixel, out, channels=("ICE", "BSE"))
  with pytest.raises(infer.InferenceError, match="predicts 3 classes but 2 class names"):
    segment(vol, pixel, out, classes=("a", "b"))
  with pytest.raises(infer.InferenceError, match="--tile=20 is not a multiple of 8"):
    segment(vol, pixel, out, tile=20, size_multiple=8)
  with pytest.raises(infer.InferenceError, match="--block=600"):
    segment(vol, pixel, out, block=600)
  with pytest.raises(infer.InferenceError, match="--window='hann'"):
    segment(vol, pixel, out, window="hann")
  with pytest.raises(infer.InferenceError, match="slices=2 must be odd"):
    segment(vol, pixel, out, slices=2)


def test_unet_blended_probabilities_are_close_to_whole_image(vol):
  """A real U-Net sees past a tile edge, so tiles change it a little; blending hides it."""
  models = pytest.importorskip("fibseg_jax.models")
  config = {"name": "unet", "num_classes": 3, "depth": 2, "features": (8, 8, 16), "norm": "batch"}
  model = models.build(config)
  variables = segment_child.random_variables(model, (1, 3, 16, 16, 2), seed=1)
  multiple = models.size_multiple(config)
  out = memory_root("seg")
  segment(vol, (model, variables), out, tile=32, overlap=8, block=512, size_multiple=multiple)
  labels = read(out)
  offset, scale = vol.normalization(CHANNELS)
  predictor = infer.TilePredictor(model, variables, offset=offset, scale=scale, overlap=8)
  image = vol.read_image(slice(None))
  whole = jax.jit(lambda v, x: model.apply(v, x, train=False))
  worst, agree = 0.0, []
  for z in range(SHAPE[0]):
    ref = whole_image_probabilities(whole, variables, vol, z, pad=8, multiple=multiple)
    geom = tiling.region_geometry(
      tiling.Block(z, 0, SHAPE[1], 0, SHAPE[2]), SHAPE[1:], halo=8, tile=32, size_multiple=multiple
    )
    slab = [image[k][np.ix_(geom.y_index, geom.x_index)] for k in tiling.slab_indices(z, 3, 5)]
    blended = infer.blend_region(predictor, slab, geom.tile_yx, 8)[8 : 8 + 70, 8 : 8 + 45]
    np.testing.assert_array_equal(labels[z], blended.argmax(-1))
    worst = max(worst, float(np.abs(blended - ref).max()))
    agree.append(np.mean(labels[z] == ref.argmax(-1)))
  print(f"U-Net tiled vs whole image: max |dp| {worst:.4f}, label agreement {np.mean(agree):.4f}")
  assert worst < 0.05, worst
  assert np.mean(agree) > 0.98, agree


# --- subprocesses ---------------------------------------------------------------------


def run_child(*args, env=None):
  proc = subprocess.run(
    [sys.executable, CHILD, *args], capture_output=True, text=True, env=env, timeout=300
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  return json.loads(proc.stdout.strip().splitlines()[-1])


def test_tiles_are_sharded_over_all_devices(tmp_path):
  root = make_volume(str(tmp_path / "vol.zarr"), shape=(3, 40, 72))
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4")
  env["JAX_PLATFORMS"] = "cpu"
  got = run_child("devices", root, str(tmp_path / "seg.zarr"), env=env)
  assert got["devices"] == 4 and got["padded_batch"] == 4 and got["output_devices"] == 4
  assert got["labels_equal"] and got["max_prob_diff"] <= 1 and got["complete"]


def test_peak_memory_does_not_grow_with_the_volume(tmp_path):
  """Peak RSS of a 4x larger stack stays within 15% of the small one's."""
  side, depth = 512, 10
  small = make_volume(str(tmp_path / "small.zarr"), shape=(depth, side, side))
  large = make_volume(str(tmp_path / "large.zarr"), shape=(4 * depth, side, side))
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  a = run_child("memory", small, str(tmp_path / "a.zarr"), env=env)
  b = run_child("memory", large, str(tmp_path / "b.zarr"), env=env)
  assert a["complete"] and b["complete"]
  # The test can fail: holding the extra slices as float32 would add more than 15%.
  extra_mb = 3 * depth * side * side * len(CHANNELS) * 4 / 2**20
  assert extra_mb > 0.15 * a["peak_rss_mb"], (extra_mb, a)
  assert b["peak_rss_mb"] < 1.15 * a["peak_rss_mb"], (a, b)


# --- the script -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  """A workdir with one checkpoint of a tiny U-Net, saved as training saves it."""
  checkpoint = pytest.importorskip("fibseg_jax.checkpoint")
  models = pytest.importorskip("fibseg_jax.models")
  from fibseg_jax.train import config as config_lib  # noqa: PLC0415 - test setup only

  workdir = tmp_path_factory.mktemp("run")
  config = config_lib.base_config()
  config.model.update({"name": "unet", "num_classes": 3, "depth": 2, "features": (4, 8, 8)})
  config.model.norm = "batch"
  config.data.classes = CLASSES
  model = models.build(config.model)
  variables = segment_child.random_variables(model, (1, 3, 16, 16, 2))
  mngr = checkpoint.manager(str(workdir / "checkpoints"))
  checkpoint.save(mngr, 1, dict(variables), config, {"position": 0})
  return str(workdir)


def run_segment(*flags):
  return subprocess.run(
    [sys.executable, SEGMENT, *flags],
    capture_output=True,
    text=True,
    timeout=300,
    env=dict(os.environ, JAX_PLATFORMS="cpu"),
  )


def test_segment_script(trained, tmp_path):
  vol_path = make_volume(str(tmp_path / "vol.zarr"), shape=(3, 40, 36))
  out, probs = str(tmp_path / "seg.zarr"), str(tmp_path / "probs.zarr")
  unc = str(tmp_path / "unc.zarr")
  flags = [f"--workdir={trained}", f"--input={vol_path}", f"--output={out}", "--tile=16"]
  proc = run_segment(
    *flags, f"--probabilities={probs}", f"--uncertainty={unc}", "--overlap=4", "--batch=2"
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert f"labels:        {out}" in proc.stdout and probs in proc.stdout
  assert f"uncertainty:   {unc}" in proc.stdout
  assert zarr.open_array(unc, mode="r").shape == (3, 40, 36)
  labels = zarr.open_array(out, mode="r")
  assert labels.shape == (3, 40, 36) and labels.attrs["classes"] == list(CLASSES)
  assert labels.attrs["fibseg_segmentation"]["run"]["checkpoint"].startswith(trained)
  assert int(np.max(labels[:])) < 3
  assert zarr.open_array(probs, mode="r").shape == (3, 40, 36, 3)

  proc = run_segment(*flags, "--overlap=4", f"--probabilities={probs}", f"--uncertainty={unc}")
  assert proc.returncode == 1 and "Traceback" not in proc.stderr
  assert proc.stderr.strip().splitlines()[-1] == (
    f"error: --output={out} exists and is complete; pass --overwrite to segment again"
  )

  proc = run_segment(f"--checkpoint={tmp_path / 'nothing'}", *flags[1:])
  assert proc.returncode == 1 and "Traceback" not in proc.stderr
  assert f"--checkpoint={tmp_path / 'nothing'}: no such directory" in proc.stderr

  ice_only = make_volume(str(tmp_path / "ice.zarr"), shape=(3, 40, 36), channels=("ICE",))
  proc = run_segment(f"--workdir={trained}", f"--input={ice_only}", f"--output={out}x")
  assert proc.returncode == 1 and "Traceback" not in proc.stderr
  assert "lacks channel(s) ['TLD'] that the model" in proc.stderr


def test_bfloat16_compute_of_a_float32_checkpoint(trained, tmp_path):
  vol_path = make_volume(str(tmp_path / "vol.zarr"), shape=(3, 40, 36))
  results = {}
  for dtype in ("float32", "bfloat16"):
    out, probs = str(tmp_path / f"{dtype}.zarr"), str(tmp_path / f"{dtype}_p.zarr")
    infer.segment_from_checkpoint(
      trained,
      vol_path,
      output=out,
      probabilities=probs,
      settings=infer.SegmentSettings(dtype=dtype, tile=16, overlap=4),
    )
    results[dtype] = read(out), read(probs).astype(np.float32) / 255
  (labels32, probs32), (labels16, probs16) = results["float32"], results["bfloat16"]
  # bfloat16 keeps 8 bits of mantissa: probabilities move by a few hundredths at most,
  # and only pixels near a tie between two classes may change label.
  assert np.abs(probs16 - probs32).max() < 0.06
  assert np.abs(probs16 - probs32).max() > 0  # it really computed in bfloat16
  assert np.mean(labels16 == labels32) > 0.9

  with pytest.raises(infer.InferenceError, match="--dtype=float16: expected one of"):
    infer.segment_from_checkpoint(
      trained,
      vol_path,
      output=str(tmp_path / "x.zarr"),
      settings=infer.SegmentSettings(dtype="float16", tile=16),
    )


def test_progress_tells_how_long_after_the_first_block(vol, pixel, capsys):
  result = segment(vol, pixel, memory_root("seg"), progress=True)
  assert result.blocks_done == 30
  err = capsys.readouterr().err
  assert re.search(
    r"first block took \d+\.\d s \(compiling included\); about (\d+\.\d s|\d+ min \d+ s) "
    r"for all 30 blocks\n",
    err,
  ), err
  # The second block, free of compiling, refines it.
  assert re.search(r"second block took \d+\.\d s; about .* more for the other 28 blocks\n", err)
  # A rate that reads (k/M prefixes on pixels, never 0.00x/s) and the blocks done.
  assert re.search(r"\d+(\.\d+)?[kM]?px/s, 30/30 blocks\]", err), err
  segment(vol, pixel, memory_root("seg"), progress=True, only_slices=[0], block=512)
  assert "first block took" not in capsys.readouterr().err  # one block: nothing to foretell


def test_durations_read_as_a_person_would_say_them():
  duration = infer.progress.duration
  assert [duration(s) for s in (12.34, 59.99, 250, 3599.4, 7500)] == [
    "12.3 s",
    "1 min 0 s",
    "4 min 10 s",
    "59 min 59 s",
    "2 h 05 min",
  ]


@pytest.fixture(scope="module")
def instance_norm(tmp_path_factory):
  """A workdir with a U-Net that normalises each tile on its own, trained on 32 pixels."""
  models = pytest.importorskip("fibseg_jax.models")
  from fibseg_jax import checkpoint  # noqa: PLC0415 - test setup only
  from fibseg_jax.train import config as config_lib  # noqa: PLC0415

  workdir = tmp_path_factory.mktemp("instance")
  config = config_lib.base_config()
  config.model.update({"name": "unet", "num_classes": 3, "depth": 2, "features": (4, 8, 8)})
  config.model.norm = "instance"
  config.data.patch = 32
  config.data.classes = CLASSES
  variables = segment_child.random_variables(models.build(config.model), (1, 3, 16, 16, 2))
  checkpoint.save(checkpoint.manager(str(workdir / "checkpoints")), 1, variables, config, {})
  return str(workdir)


def test_tile_below_the_training_patch_of_a_per_tile_norm_is_refused(
  instance_norm, vol, pixel, tmp_path
):
  vol_path = make_volume(str(tmp_path / "vol.zarr"), shape=(2, 48, 48))
  step = os.path.join(instance_norm, "checkpoints", "1")
  with pytest.raises(
    infer.InferenceError,
    match=re.escape(
      f"--tile=16 is below the training patch of 32 pixels (data.patch of {step}): the "
      "model normalises each tile on its own (instance or group norm), so smaller tiles "
      "see other statistics than in training; use --tile=32 or more"
    ),
  ):
    infer.segment_from_checkpoint(
      instance_norm,
      vol_path,
      output=str(tmp_path / "a"),
      settings=infer.SegmentSettings(tile=16, overlap=4),
    )
  result = infer.segment_from_checkpoint(
    instance_norm,
    vol_path,
    output=str(tmp_path / "b"),
    settings=infer.SegmentSettings(tile=32, overlap=8),
  )
  assert result.complete
  # Where the block (or the volume) bounds the tiles anyway, --tile does not matter.
  small = segment(vol, pixel, memory_root("seg"), tile=16, block=8, only_slices=[0], train_patch=32)
  assert small.complete


# --- test-time augmentation ------------------------------------------------------------


def test_tta_transforms():
  assert len(predict.tta_transforms((16, 16), 3)) == 16  # D4 x slab reversal
  assert len(predict.tta_transforms((16, 16), 1)) == 8
  assert len(predict.tta_transforms((16, 32), 1)) == 4  # flips only: turns would not fit
  assert len(set(predict.tta_transforms((16, 16), 3))) == 16


def test_tta_mean_maps_every_transform_back():
  """A map that is not equivariant: each transform's output must land back where it came."""
  rng = np.random.default_rng(5)
  x = jnp.asarray(rng.normal(size=(2, 3, 8, 8, 2)), jnp.float32)
  ramp = jnp.linspace(0, 1, 8)

  def probs(t):  # depends on position (ramp) and on slice order (weights 1, 2, 3)
    logits = jnp.einsum("bsyxc,s->byxc", t, jnp.array([1.0, 2.0, 3.0])) * ramp[None, None, :, None]
    return jax.nn.softmax(logits, axis=-1)

  got = predict.augmented_mean(probs, x)
  want = np.zeros((2, 8, 8, 2))
  xn = np.asarray(x)
  for reverse in (False, True):
    for k in range(4):
      for flip in (False, True):
        t = xn[:, ::-1] if reverse else xn
        t = np.rot90(t, k, axes=(2, 3))
        t = t[:, :, :, ::-1] if flip else t
        p = np.asarray(probs(jnp.asarray(t.copy())))
        p = p[:, :, ::-1] if flip else p
        want += np.rot90(p, -k, axes=(1, 2))
  np.testing.assert_allclose(np.asarray(got), want / 16, atol=1e-6)
  assert np.abs(np.asarray(got) - np.asarray(probs(x))).max() > 1e-3  # TTA changed it


def _moved(x, reverse, flip_y, flip_x, transpose):
  """x [batch, slices, y, x, c] moved by an explicit transform (the order the passes use)."""
  x = x[:, ::-1] if reverse else x
  x = x[:, :, ::-1] if flip_y else x
  x = x[:, :, :, ::-1] if flip_x else x
  return np.swapaxes(x, 2, 3) if transpose else x


def _moved_back(p, flip_y, flip_x, transpose):
  """p [batch, y, x, classes] of a moved input, mapped back."""
  p = np.swapaxes(p, 1, 2) if transpose else p
  p = p[:, :, ::-1] if flip_x else p
  return p[:, ::-1] if flip_y else p


@pytest.mark.parametrize("passes", [1, 2, 4, 8, 16])
def test_tta_k_passes_average_the_first_k_transforms(passes):
  """Pass k adds, in order: identity, x flip, y flip, both, the 4 transposed, then reversed."""
  rng = np.random.default_rng(6)
  x = rng.normal(size=(2, 3, 8, 8, 2)).astype(np.float32)
  ramp_y, ramp_x = jnp.linspace(0, 1, 8), jnp.linspace(1, 3, 8) ** 2

  def probs(t):  # position (y and x differently) and slice order matter
    logits = jnp.einsum("bsyxc,s->byxc", t, jnp.array([1.0, 2.0, 3.0]))
    return jax.nn.softmax(logits * ramp_y[None, :, None, None] + ramp_x[None, None, :, None], -1)

  plane = [(fy, fx, False) for fy, fx in ((0, 0), (0, 1), (1, 0), (1, 1))]
  plane += [(fy, fx, True) for fy, fx in ((0, 0), (0, 1), (1, 0), (1, 1))]
  order = [(r, *t) for r in (False, True) for t in plane][:passes]
  want = sum(
    _moved_back(np.asarray(probs(jnp.asarray(_moved(x, r, *t).copy()))), *t) for r, *t in order
  )
  got = predict.augmented_mean(probs, jnp.asarray(x), passes)
  np.testing.assert_allclose(np.asarray(got), want / passes, atol=1e-6)
  if passes == 1:  # one pass is no TTA
    np.testing.assert_allclose(np.asarray(got), np.asarray(probs(jnp.asarray(x))), atol=1e-7)


def test_tta_values():
  parse = infer.settings.parse_tta
  assert [parse(v) for v in (False, True, "off", "1", 2, "4", "8", "all", "16")] == [
    1,
    16,
    1,
    1,
    2,
    4,
    8,
    16,
    16,
  ]
  assert parse("auto") == "auto" and infer.SegmentSettings(tta=True).tta == 16
  assert infer.settings.tta_passes("auto", "gpu") == 16
  assert infer.settings.tta_passes("auto", "cpu") == infer.settings.AUTO_PASSES["cpu"]
  for bad in ("3", "yes", 32, "on"):
    with pytest.raises(infer.InferenceError, match=r"^--tta=.*: expected one of off, 1, 2, 4"):
      infer.SegmentSettings(tta=bad)


def test_tta_run_record_and_resume(vol, pixel):
  """Off leaves no key (old outputs resume); all is True (old records with TTA); else k."""
  out = {k: memory_root(f"seg{k}") for k in (1, 4, 16)}
  for k, path in out.items():
    segment(vol, pixel, path, tta=k, only_slices=[2])
  runs = {k: infer.read_attributes(path)[store.ATTRIBUTE]["run"] for k, path in out.items()}
  assert {k: run.get("tta") for k, run in runs.items()} == {1: None, 4: 4, 16: True}
  # The same run (old bool True = all passes): found complete, not another run.
  with pytest.raises(store.OutputError, match="exists and is complete"):
    segment(vol, pixel, out[16], tta=True, only_slices=[2])
  with pytest.raises(store.OutputError, match=r"tta: 4 != 2\); it was written with --tta=4"):
    segment(vol, pixel, out[4], tta=2, only_slices=[2])


def test_tta_leaves_an_equivariant_model_unchanged(vol):
  """A per-pixel model of one slice commutes with flips and turns: TTA changes nothing."""
  one_slice = segment_child.pixel_model(1, len(CHANNELS))
  paths = {name: memory_root(name) for name in ("plain", "p", "tta", "pt")}
  segment(vol, one_slice, paths["plain"], slices=1, probabilities=paths["p"])
  segment(vol, one_slice, paths["tta"], slices=1, probabilities=paths["pt"], tta=True)
  np.testing.assert_array_equal(read(paths["tta"]), read(paths["plain"]))
  diff = np.abs(read(paths["pt"]).astype(int) - read(paths["p"]).astype(int))
  assert diff.max() <= 1  # uint8 rounding of float sums in another order


# --- ensembles ---------------------------------------------------------------------------


def _checkpoint_like(trained, workdir, seed, classes=CLASSES):
  """Another checkpoint of the `trained` fixture's model, with other random weights."""
  from fibseg_jax import checkpoint  # noqa: PLC0415

  restored = checkpoint.load(trained)
  config = restored.config
  config.data.classes = classes
  variables = segment_child.random_variables(restored.model, (1, 3, 16, 16, 2), seed=seed)
  checkpoint.save(checkpoint.manager(str(workdir / "checkpoints")), 1, variables, config, {})
  return str(workdir)


def test_ensemble_averages_the_members_probabilities(trained, tmp_path):
  other = _checkpoint_like(trained, tmp_path / "other", seed=7)
  vol_path = make_volume(str(tmp_path / "vol.zarr"), shape=(3, 40, 36))
  probs = {}
  for name, members in (("a", [trained]), ("b", [other]), ("ab", [trained, other])):
    out = str(tmp_path / f"{name}.zarr")
    infer.segment_from_checkpoint(
      members,
      vol_path,
      output=out,
      probabilities=out + "p",
      settings=infer.SegmentSettings(tile=16, overlap=4),
    )
    probs[name] = read(out + "p").astype(np.float32)
  assert np.abs(probs["a"] - probs["b"]).max() > 20  # the members really differ
  # uint8 rounding of each side: within one step of the mean.
  assert np.abs(probs["ab"] - (probs["a"] + probs["b"]) / 2).max() <= 1.0
  attrs = zarr.open_array(str(tmp_path / "ab.zarr"), mode="r").attrs
  assert attrs["fibseg_segmentation"]["run"]["checkpoint"].count(",") == 1


def test_ensemble_members_must_agree(trained, tmp_path):
  other = _checkpoint_like(trained, tmp_path / "other", seed=1, classes=("a", "b", "c"))
  vol_path = make_volume(str(tmp_path / "vol.zarr"), shape=(3, 40, 36))
  with pytest.raises(infer.InferenceError, match="ensemble members disagree on classes"):
    infer.segment_from_checkpoint([trained, other], vol_path, output=str(tmp_path / "x.zarr"))
