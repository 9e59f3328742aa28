"""Tests of fibseg_jax.data.loader on small in-memory volumes.

The test volume's image holds each voxel's own coordinates (channels "Z", "Y", "X"), so
decoding a batch tells exactly which voxels were read, wherever augmentation moved them,
and its labels are a function of position, so image/label alignment can be checked.
"""

import dataclasses
import threading
import uuid

import numpy as np
import pytest

from fibseg_jax.data import reader, split
from fibseg_jax.data import volume as volume_lib
from fibseg_jax.data.loader import LoaderConfig, SlabLoader
from fibseg_jax.data.plans import PatchPlan
from fibseg_jax.train import data_config, losses

IGNORE = volume_lib.IGNORE_LABEL
DEPTH, SIZE = 6, 64
ANNOTATED = (0, 2, 5)
EVAL_ONLY_CLASS = 3  # fills slice 5, so its labels are recognisable anywhere


def expected_label(z, y, x):
  """The label the test volume holds at (z, y, x) where it is annotated."""
  return np.where(z == 5, EVAL_ONLY_CLASS, (y // 3 + 2 * (x // 5)) % 3)


def _memory_root(prefix):
  return f"memory://{prefix}-{uuid.uuid4().hex[:8]}"


def _make_volume(annotated=ANNOTATED, all_ignored=False):
  """[6, 64, 64] float32 volume: image = (z, y, x); slice 2 annotated only at x >= 32."""
  root = _memory_root("loader")
  zz, yy, xx = np.meshgrid(np.arange(DEPTH), np.arange(SIZE), np.arange(SIZE), indexing="ij")
  with volume_lib.create_volume(
    root,
    shape=(DEPTH, SIZE, SIZE),
    dtype="float32",
    channels=("Z", "Y", "X"),
    classes=("a", "b", "c", "eval_only"),
    voxel_size_nm=(20, 10, 10),
  ) as writer:
    for z in range(DEPTH):
      image = np.stack([zz[z], yy[z], xx[z]], -1).astype(np.float32)
      labels = None
      if z in annotated:
        labels = expected_label(zz[z], yy[z], xx[z]).astype(np.uint8)
        if z == 2:
          labels[:, : SIZE // 2] = IGNORE
        if all_ignored:
          labels[:] = IGNORE
      writer.write_slice(z, image, labels)
    writer.commit()
  return volume_lib.open_volume(root)


@pytest.fixture(scope="module")
def volume():
  return _make_volume()


def _config(**overrides):
  base = dict(
    channels=("Z", "Y", "X"),
    slices=3,
    patch=16,
    batch_size=4,
    val_block=16,
    gain=0.0,
    offset=0.0,
    gamma=0.0,
    prefetch=2,
  )
  base.update(overrides)
  # As training builds it (train.data_config), so errors name the --config flags.
  return LoaderConfig(**base, flag_names=data_config.FLAGS)


def _decode(loader, image):
  """Voxel coordinates [..., (z, y, x)] from a batch image (channels in config order)."""
  offset, scale = loader.volume.normalization(loader.config.channels)
  coords = np.rint(image / scale + offset).astype(np.int64)
  order = [loader.config.channels.index(c) for c in "ZYX"]
  return coords[..., order]


def _take(iterator, n):
  return [next(iterator) for _ in range(n)]


def test_slab_indices_reflect_like_numpy_pad():
  np.testing.assert_array_equal(reader.slab_indices(0, 5, 6), [2, 1, 0, 1, 2])
  np.testing.assert_array_equal(reader.slab_indices(5, 5, 6), [3, 4, 5, 4, 3])
  np.testing.assert_array_equal(reader.slab_indices(3, 1, 6), [3])
  np.testing.assert_array_equal(reader.slab_indices(0, 3, 1), [0, 0, 0])
  for depth in (2, 3, 6):
    for slices in (1, 3, 5, 9):
      padded = np.pad(np.arange(depth), slices // 2, mode="reflect")
      for center in range(depth):
        np.testing.assert_array_equal(
          reader.slab_indices(center, slices, depth), padded[center : center + slices]
        )


def test_slabs_at_stack_ends_read_reflected_slices_and_chosen_channels(volume):
  with SlabLoader(volume, _config(slices=5, channels=("X", "Z"), prefetch=0)) as loader:
    z = np.array([0, 5, 2])
    y0, x0 = np.array([0, 48, 10]), np.array([48, 3, 40])
    own = np.stack([y0, y0 + 16, x0, x0 + 16], 1)
    batch = loader.read(PatchPlan.identity(z, y0, x0, own, 2), validation=True)
  assert batch["image"].shape == (3, 5, 16, 16, 2) and batch["image"].dtype == np.float32
  offset, scale = volume.normalization(("X", "Z"))
  raw = np.rint(batch["image"] / scale + offset).astype(int)  # [n, slices, y, x, (X, Z)]
  np.testing.assert_array_equal(raw[0, :, 0, 0, 1], [2, 1, 0, 1, 2])
  np.testing.assert_array_equal(raw[1, :, 0, 0, 1], [3, 4, 5, 4, 3])
  np.testing.assert_array_equal(raw[2, :, 0, 0, 1], [0, 1, 2, 3, 4])
  for i in range(3):
    assert (raw[i, :, :, :, 0] == np.arange(x0[i], x0[i] + 16)).all()
  # Normalised with the stored percentiles: values lie about in [-1, 1].
  assert -1.2 < batch["image"].min() and batch["image"].max() < 1.2


def test_training_batches_follow_the_plan_and_hold_training_pixels(volume):
  config = _config(augment=False, batch_size=8)
  with SlabLoader(volume, config) as loader:
    stream = loader.batches()
    for step in range(5):
      batch = next(stream)
      plan = loader.train_plan(step)
      coords = _decode(loader, batch["image"])
      np.testing.assert_array_equal(coords[:, 1, 0, 0], np.stack([plan.z, plan.y0, plan.x0], 1))
      for i in range(8):
        slab = reader.slab_indices(plan.z[i], 3, DEPTH)
        np.testing.assert_array_equal(coords[i, :, 0, 0, 0], slab)
      assert batch["labels"].dtype == np.uint8 and batch["labels"].shape == (8, 16, 16)
      assert ((batch["labels"] != IGNORE).sum((1, 2)) > 0).all()


def test_split_holds_out_a_quarter_in_whole_blocks(volume):
  with SlabLoader(volume, _config()) as loader:
    masks = loader.split_masks()
    counts = loader.class_counts()
    blocks = loader.validation_blocks()
  annotated = 2 * SIZE * SIZE + SIZE * SIZE // 2
  assert loader.train_area + loader.val_area == annotated
  # Blocks of 256 (full) or 0 annotated pixels: the best split is 10 blocks exactly.
  assert loader.val_area == pytest.approx(0.25 * annotated, abs=128)
  assert sorted(masks) == [0, 2, 5]
  for z, y0, y1, x0, x1 in blocks:
    assert (y1 - y0, x1 - x0) == (16, 16)
    assert (masks[z][y0:y1, x0:x1] == split.REGION_VALIDATION).all()
  val_pixels = sum(int((m == split.REGION_VALIDATION).sum()) for m in masks.values())
  assert val_pixels == loader.val_area
  # Both annotated halves of the stack give validation blocks (blocks drawn jointly).
  assert len({b[0] for b in blocks}) >= 2
  assert (masks[2][:, :32] == split.REGION_UNLABELLED).all()
  # Training histogram = labels of the training region, counted independently.
  expected = np.zeros(4, np.int64)
  for z, m in masks.items():
    np.add.at(expected, volume.read_labels(z)[m == split.REGION_TRAIN], 1)
  np.testing.assert_array_equal(counts, expected)
  assert counts.sum() == loader.train_area
  assert "25.0%" in loader.summary()


def test_split_depends_on_seed_only(volume):
  with SlabLoader(volume, _config(seed=1)) as a, SlabLoader(volume, _config(seed=1, patch=32)) as b:
    assert a.validation_blocks() == b.validation_blocks()
  with SlabLoader(volume, _config(seed=2)) as c:
    assert a.validation_blocks() != c.validation_blocks()


def test_validation_and_unannotated_pixels_never_labelled_in_training(volume):
  # Flips, rotations and slab reversal on, so labels move with the image.
  config = _config(batch_size=8, eval_slices=(5,), reverse_slab=True)
  with SlabLoader(volume, config) as loader:
    masks = loader.split_masks()
    stream = loader.batches()
    seen_train = 0
    turned = 0
    for step in range(40):
      batch = next(stream)
      plan = loader.train_plan(step)
      turned += int(plan.rot90.any() | plan.flip_x.any() | plan.flip_y.any())
      centre = _decode(loader, batch["image"][:, 1])  # [n, p, p, (z, y, x)]
      labelled = batch["labels"] != IGNORE
      z, y, x = (centre[..., i][labelled] for i in range(3))
      region = np.stack([masks[int(zz)][yy, xx] for zz, yy, xx in zip(z, y, x, strict=True)])
      assert (region == split.REGION_TRAIN).all()
      # Alignment: each label is the volume's label at the voxel its image pixel shows.
      np.testing.assert_array_equal(batch["labels"][labelled], expected_label(z, y, x))
      assert EVAL_ONLY_CLASS not in batch["labels"]
      assert not (centre[..., 0] == 5).any()
      seen_train += labelled.sum()
    assert turned > 30 and seen_train > 0
    assert loader.class_counts()[EVAL_ONLY_CLASS] == 0


def test_augmentation_moves_image_and_labels_together(volume):
  config = _config(batch_size=16, slices=3, reverse_slab=True)
  with SlabLoader(volume, config) as loader:
    batch = next(loader.batches(start_step=3))
    plan = loader.train_plan(3)
  coords = _decode(loader, batch["image"])
  assert plan.reverse.any() and plan.rot90.any() and plan.flip_y.any()
  for i in range(16):
    # Every slice of the slab shows the same y-x pixel at each position.
    assert (coords[i, :, ..., 1:] == coords[i, 1:2, ..., 1:]).all()
    z_order = coords[i, :, 0, 0, 0]
    step = -1 if plan.reverse[i] else 1
    if plan.z[i] not in (0, DEPTH - 1):
      np.testing.assert_array_equal(np.diff(z_order), [step, step])
    # The patch shows the planned window, moved by the planned flips and turn.
    window = np.stack(
      np.meshgrid(
        np.arange(plan.y0[i], plan.y0[i] + 16),
        np.arange(plan.x0[i], plan.x0[i] + 16),
        indexing="ij",
      ),
      -1,
    )
    if plan.flip_y[i]:
      window = window[::-1]
    if plan.flip_x[i]:
      window = window[:, ::-1]
    window = np.rot90(window, plan.rot90[i])
    np.testing.assert_array_equal(coords[i, 1, ..., 1:], window)
    labelled = batch["labels"][i] != IGNORE
    np.testing.assert_array_equal(
      batch["labels"][i][labelled],
      expected_label(plan.z[i], window[..., 0], window[..., 1])[labelled],
    )


def test_intensity_jitter_per_channel(volume):
  config = _config(gain=0.3, offset=0.2, gamma=0.5, flips=False, rot90=False, reverse_slab=False)
  with SlabLoader(volume, config, process_count=1) as loader:
    plan = loader.train_plan(0)
    jittered = loader.read(plan)["image"]
    base = loader.read(PatchPlan.identity(plan.z, plan.y0, plan.x0, plan.own, 3))["image"]
  gain, offset, gamma = (a[:, None, None, None, :] for a in (plan.gain, plan.offset, plan.gamma))
  assert (np.abs(plan.gain - 1) <= 0.3).all() and (np.abs(plan.gamma - 1) <= 0.5).all()
  assert np.unique(plan.gain).size == plan.gain.size  # per sample and channel
  u = (base + 1) / 2
  inside = (u > 0) & (u < 1)
  curved = np.where(inside, np.clip(u, 0, 1) ** gamma * 2 - 1, base)
  np.testing.assert_allclose(jittered, curved * gain + offset, rtol=1e-5, atol=1e-6)


def test_eval_slices_are_never_trained_or_validated(volume):
  with SlabLoader(volume, _config(eval_slices=(5,), batch_size=8)) as loader:
    assert loader.train_slices == (0, 2)
    masks = loader.split_masks()
    assert (masks[5] == split.REGION_EVALUATION).all()
    for batch in loader.validation_batches():
      assert EVAL_ONLY_CLASS not in batch["labels"]
    assert all(b[0] != 5 for b in loader.validation_blocks())


@pytest.mark.parametrize("patch", [8, 32])
def test_validation_tiles_label_each_validation_pixel_once(volume, patch):
  config = _config(patch=patch, batch_size=3, size_multiple=8)
  with SlabLoader(volume, config) as loader:
    masks = loader.split_masks()
    hits = {z: np.zeros((SIZE, SIZE), np.int64) for z in masks}
    batches = list(loader.validation_batches())
    assert len(batches) == loader.num_validation_batches
    padding = (
      len(loader.validation_plan()) - len(loader.validation_blocks()) * (16 // patch or 1) ** 2
    )
    assert 0 <= padding < 3
    for batch in batches:
      assert batch["image"].shape == (3, 3, patch, patch, 3)
      assert batch["labels"].shape == (3, patch, patch)
      centre = _decode(loader, batch["image"][:, 1])
      labelled = batch["labels"] != IGNORE
      for i in range(3):
        if not labelled[i].any():
          continue
        z, y, x = (centre[i][..., k][labelled[i]] for k in range(3))
        np.add.at(hits[int(z[0])], (y, x), 1)
        np.testing.assert_array_equal(batch["labels"][i][labelled[i]], expected_label(z, y, x))
    empty = [b for b in batches for row in b["labels"] if (row == IGNORE).all()]
    assert len(empty) == padding
  for z, m in masks.items():
    np.testing.assert_array_equal(hits[z], (m == split.REGION_VALIDATION).astype(int))


def test_same_seed_and_step_give_the_same_batch(volume):
  config = _config(batch_size=4)
  with (
    SlabLoader(volume, config) as a,
    SlabLoader(volume, dataclasses.replace(config, prefetch=0, workers=1)) as b,
  ):
    run = _take(a.batches(), 4)
    resumed = _take(b.batches(start_step=2), 2)
    again = _take(a.batches(), 1)
  for got, want in zip(resumed, run[2:], strict=True):
    np.testing.assert_array_equal(got["image"], want["image"])
    np.testing.assert_array_equal(got["labels"], want["labels"])
  np.testing.assert_array_equal(again[0]["image"], run[0]["image"])
  assert not np.array_equal(run[0]["image"], run[1]["image"])
  with SlabLoader(volume, dataclasses.replace(config, seed=5)) as c:
    assert not np.array_equal(next(c.batches())["image"], run[0]["image"])


def test_processes_read_disjoint_shares_of_the_global_batch(volume):
  config = _config(batch_size=4)
  with SlabLoader(volume, config, process_index=0, process_count=1) as whole:
    train, val = next(whole.batches(start_step=7)), list(whole.validation_batches())
  shares = []
  for index in (0, 1):
    with SlabLoader(volume, config, process_index=index, process_count=2) as part:
      assert part.local_batch_size == 2
      shares.append((next(part.batches(start_step=7)), list(part.validation_batches())))
  for key in ("image", "labels"):
    np.testing.assert_array_equal(np.concatenate([s[0][key] for s in shares]), train[key])
    for k, batch in enumerate(val):
      np.testing.assert_array_equal(
        np.concatenate([shares[0][1][k][key], shares[1][1][k][key]]), batch[key]
      )


def test_labels_outside_the_annotated_region_are_ignored(volume):
  with SlabLoader(volume, _config(val_fraction=0.0, prefetch=0)) as loader:
    own = np.array([[8, 24, 24, 40]])
    batch = loader.read(PatchPlan.identity(np.array([2]), np.array([8]), np.array([24]), own, 3))
  labels = batch["labels"][0]
  assert (labels[:, :8] == IGNORE).all()  # x 24..31 of slice 2 is not annotated
  yy, xx = np.meshgrid(np.arange(8, 24), np.arange(32, 40), indexing="ij")
  np.testing.assert_array_equal(labels[:, 8:], expected_label(2, yy, xx))
  assert loader.val_area == 0 and loader.validation_blocks() == []


@pytest.mark.parametrize(
  "overrides, kwargs, message",
  [
    (
      dict(channels=("BSE",)),
      {},
      r"--config.data.channels: channel\(s\) \['BSE'\] not in volume memory://loader-\w+, "
      r"which has \['Z', 'Y', 'X'\]",
    ),
    (dict(channels=()), {}, r"--config.data.channels is empty"),
    (dict(channels=("Z", "Z")), {}, r"names a channel twice"),
    (dict(slices=4), {}, r"--config.data.slices=4: must be odd \(1, 3, 5, ...\)"),
    (dict(slices=0), {}, r"--config.data.slices=0: must be an integer >= 1"),
    (
      dict(patch=128),
      {},
      r"--config.data.patch=128 is larger than the volume's y-x size \(64, 64\)",
    ),
    (
      dict(patch=20, size_multiple=8),
      {},
      r"--config.data.patch=20 must be a multiple of 8 for this model \(nearest valid: 16, 24\)",
    ),
    (
      dict(eval_slices=(0, 2, 5)),
      {},
      r"volume memory://loader-\w+ has no annotated slices outside --config.data.eval_slices",
    ),
    (dict(eval_slices=(9,)), {}, r"--config.data.eval_slices: slice\(s\) \[9\] outside"),
    (
      dict(batch_size=6),
      dict(process_count=4, process_index=0),
      r"--config.train.batch_size=6 must be divisible by the number of processes \(4\)",
    ),
    (dict(val_fraction=1.0), {}, r"--config.data.val_fraction=1.0: must be in \[0, 1\)"),
    (dict(gamma=1.5), {}, r"--config.data.gamma=1.5: must be in \[0, 1\)"),
    (dict(val_block=0), {}, r"--config.data.val_block=0: must be an integer >= 1"),
    (
      dict(val_block=64, eval_slices=(0, 5)),
      {},
      r"--config.data.val_block=64 is too coarse to hold out --config.data.val_fraction=0.25",
    ),
  ],
)
def test_bad_settings_name_the_flag(volume, overrides, kwargs, message):
  with pytest.raises(ValueError, match=message):
    SlabLoader(volume, _config(**overrides), **kwargs)


def test_volumes_without_usable_labels_are_refused():
  with pytest.raises(ValueError, match=r"volume memory://loader-\w+ has no annotated slices$"):
    SlabLoader(_make_volume(annotated=()), _config())
  with pytest.raises(ValueError, match=r"annotated slices \[0, 2, 5\] hold no labels"):
    SlabLoader(_make_volume(all_ignored=True), _config())


def test_channel_names_from_a_command_line_string(volume):
  config = _config(channels="Y, X", eval_slices=5)
  assert config.channels == ("Y", "X") and config.eval_slices == (5,)
  with SlabLoader(volume.root, config) as loader:
    assert next(loader.batches())["image"].shape == (4, 3, 16, 16, 2)


def test_prefetcher_reraises_reader_errors_and_stops():
  def produce(key):
    if key == 3:
      raise KeyError(f"cannot read {key}")
    return key * 10

  prefetcher = reader.Prefetcher(produce, range(10), depth=2)
  assert [next(prefetcher) for _ in range(3)] == [0, 10, 20]
  with pytest.raises(KeyError, match="cannot read 3"):
    next(prefetcher)
  assert not prefetcher.running
  assert list(reader.Prefetcher(produce, range(3), depth=1)) == [0, 10, 20]


def test_close_stops_the_prefetch_threads(volume):
  before = threading.active_count()
  loader = SlabLoader(volume, _config(prefetch=3))
  stream = loader.batches()
  next(stream)
  assert stream.running and threading.active_count() > before
  loader.close()
  assert not stream.running
  with pytest.raises(StopIteration):
    next(stream)


def test_class_weights_inverse_sqrt_frequency():
  np.testing.assert_allclose(losses.class_weights([100, 400, 0]), [4 / 3, 2 / 3, 0])
  weights = losses.class_weights(np.array([9, 9]))
  assert weights.dtype == np.float32
  np.testing.assert_allclose(weights, [1, 1])
  with pytest.raises(ValueError, match="no labelled training pixels"):
    losses.class_weights([0, 0])


def test_split_seed_fixes_the_split_across_training_seeds(volume):
  def blocks(**kw):
    with SlabLoader(volume, _config(**kw)) as ld:
      return ld.validation_blocks()

  assert blocks(seed=1, split_seed=5) == blocks(seed=2, split_seed=5)
  assert blocks(seed=1, split_seed=5) != blocks(seed=1, split_seed=6)


# The recipe beyond the symmetries (data.augment's warp, degradations, artifacts) and
# rare-class sampling.

WARP = dict(rotation=180.0, scale=0.5, elastic=3.0, spatial_p=1.0)


def _positions(loader, image):
  """The exact (unrounded) volume positions [..., (z, y, x)] a batch image shows."""
  offset, scale = loader.volume.normalization(loader.config.channels)
  order = [loader.config.channels.index(c) for c in "ZYX"]
  return (image / scale + offset)[..., order]


def test_warped_labels_follow_the_image_and_keep_255(volume):
  """Rotation, scaling and elastic deformation on every patch: each label is the
  volume's label at the position its (bilinear) image pixel shows, 255 stays 255 (never
  a class) and the validation and evaluation labels are never read."""
  config = _config(batch_size=8, eval_slices=(5,), **WARP)
  with SlabLoader(volume, config) as loader:
    masks = loader.split_masks()
    warped = agreed = labelled_total = 0
    for step in range(6):
      plan = loader.train_plan(step)
      batch = loader.read(plan)
      warped += int((plan.angle != 0).sum())
      at = _positions(loader, batch["image"][:, 1])
      # The image is linear in position, so bilinear resampling shows it exactly; away
      # from the volume's edges (mirrored) the label is the one at the rounded position.
      inside = ((at[..., 1:] > 0.5) & (at[..., 1:] < SIZE - 1.5)).all(-1)
      labels = batch["labels"]
      assert set(np.unique(labels)) <= {0, 1, 2, IGNORE}
      z, y, x = (np.rint(at[..., i]).astype(np.int64) for i in range(3))
      region = np.stack(
        [masks[int(zz)][yy, xx] for zz, yy, xx in zip(z[inside], y[inside], x[inside], strict=True)]
      )
      lab = labels[inside]
      assert (region[lab != IGNORE] == split.REGION_TRAIN).all()
      # Every label is the volume's training label where its image pixel is (beyond the
      # volume's edge the image is mirrored and the labels are 255, so not both ways).
      want = np.where(
        region == split.REGION_TRAIN, expected_label(z[inside], y[inside], x[inside]), IGNORE
      )
      agreed += int((lab == want)[lab != IGNORE].sum())
      labelled_total += int((lab != IGNORE).sum())
  assert warped == 6 * 8
  assert labelled_total > 0.4 * 6 * 8 * 16 * 16
  assert agreed >= 0.999 * labelled_total


def test_warp_is_the_same_for_every_slice_and_drift_moves_only_the_side_slices(volume):
  config = _config(batch_size=4, **WARP, drift=2.0, artifact_p=1.0)
  with SlabLoader(volume, config) as loader:
    plan = loader.train_plan(1)
    at = _positions(loader, loader.read(plan)["image"])  # [n, s, p, p, 3]
  assert (plan.drift[:, 1] == 0).all() and np.abs(plan.drift).max() > 0.5
  for i in range(4):
    for j in (0, 2):
      inside = ((at[i, j, ..., 1:] > 2) & (at[i, j, ..., 1:] < SIZE - 3)).all(-1)
      inside &= ((at[i, 1, ..., 1:] > 2) & (at[i, 1, ..., 1:] < SIZE - 3)).all(-1)
      shift = at[i, j, ..., 1:][inside] - at[i, 1, ..., 1:][inside]
      # The symmetry turns the drift with the image (and may reverse the slab); its
      # length is what was drawn.
      drawn = plan.drift[i, 2 - j if plan.reverse[i] else j]
      np.testing.assert_allclose(np.linalg.norm(shift, axis=-1), np.linalg.norm(drawn), atol=1e-3)


ALL_ON = dict(
  **WARP,
  drift=1.0,
  noise=0.1,
  blur=1.0,
  contrast=0.25,
  lowres=0.5,
  invert_gamma=0.5,
  intensity_p=1.0,
  curtain=0.3,
  shading=0.3,
  charging=0.3,
  artifact_p=1.0,
  gain=0.1,
  offset=0.1,
  gamma=0.2,
)


def test_the_whole_recipe_is_a_pure_function_of_seed_and_step(volume):
  config = _config(batch_size=4, workers=3, **ALL_ON)
  with SlabLoader(volume, config) as a, SlabLoader(volume, config) as b:
    first = _take(a.batches(start_step=2), 2)
    again = _take(b.batches(start_step=2), 2)
    other = next(b.batches(start_step=5))
  for x, y in zip(first, again, strict=True):
    np.testing.assert_array_equal(x["image"], y["image"])
    np.testing.assert_array_equal(x["labels"], y["labels"])
  assert not np.array_equal(first[0]["image"], other["image"])
  assert np.isfinite(first[0]["image"]).all()


def test_degradations_change_the_image_not_the_labels_and_each_channel_on_its_own(volume):
  base = _config(batch_size=4, flips=False, rot90=False, reverse_slab=False)
  with SlabLoader(volume, base) as loader:
    plan = loader.train_plan(0)
    clean = loader.read(plan)
  for name, value in [
    ("noise", 0.1),
    ("blur", 1.0),
    ("contrast", 0.25),
    ("lowres", 0.5),
    ("curtain", 0.3),
    ("shading", 0.3),
    ("charging", 0.3),
  ]:
    p = "artifact_p" if name in ("curtain", "shading", "charging") else "intensity_p"
    config = dataclasses.replace(base, **{name: value, p: 1.0})
    with SlabLoader(volume, config) as loader:
      plan = loader.train_plan(0)
      out = loader.read(plan)
    np.testing.assert_array_equal(out["labels"], clean["labels"])
    change = np.abs(out["image"] - clean["image"])
    assert change.max() > 1e-3, name
    # Each detector (channel) draws its own: the changes differ between channels.
    assert not np.allclose(change[..., 0], change[..., 1]), name


def test_curtains_run_along_y_within_a_few_degrees():
  from fibseg_jax.data import augment

  jitter = augment.Jitter.none(1)._replace(curtain=np.array([0.5], np.float32))
  along = across = 0.0
  for seed in range(5):
    add, mul = augment.artifact_field(jitter, 0, 64, 0.0, np.random.default_rng(seed))
    assert mul is None
    along += np.abs(np.diff(add, axis=0)).mean()
    across += np.abs(np.diff(add, axis=1)).mean()
  assert along < 0.25 * across


def test_rare_class_sampling_raises_the_rare_class_share(volume):
  # Class 2 of the test volume is rare once most of it is unlabelled.
  root = _memory_root("rare")
  with volume_lib.create_volume(
    root,
    shape=(3, SIZE, SIZE),
    dtype="uint8",
    channels=("A",),
    classes=("a", "b", "c"),
    voxel_size_nm=(20, 10, 10),
  ) as writer:
    for z in range(3):
      labels = np.zeros((SIZE, SIZE), np.uint8)
      labels[:, SIZE // 2 :] = 1
      labels[40:44, 4:8] = 2  # 16 of 4096 pixels
      writer.write_slice(z, np.full((SIZE, SIZE, 1), 7, np.uint8), labels)
    writer.commit()
  rare = volume_lib.open_volume(root)

  def share(fraction):
    config = LoaderConfig(
      channels=("A",),
      slices=1,
      patch=16,
      batch_size=8,
      val_block=32,
      rare_fraction=fraction,
      prefetch=0,
    )
    with SlabLoader(rare, config) as loader:
      labels = np.concatenate([loader.read(loader.train_plan(s))["labels"] for s in range(20)])
    return (labels == 2).sum() / (labels != IGNORE).sum()

  assert share(0.5) > 5 * share(0.0)
