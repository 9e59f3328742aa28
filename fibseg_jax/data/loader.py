"""Slab loader: training and validation patches around the annotated slices of a volume.

A sample is a slab of `slices` consecutive sections centred on an annotated slice, cut to
a `patch` x `patch` window in y-x, with the named channels normalised by the volume's
stored percentiles, and the labels of the central slice:

  image  float32 [batch, slices, patch, patch, channels]
  labels uint8   [batch, patch, patch], 255 (`IGNORE_LABEL`) = no label here

Near the ends of the stack the slab is reflected without repeating the edge slice (numpy's
``mode="reflect"``): centre 0 of a 5-slice slab reads slices [2, 1, 0, 1, 2]; see
`reader.slab_indices`, which whole-volume inference uses too.

`SlabLoader` composes the rooms of the data path, split along the line connectomics draws
between what to read (`TensorSource`) and how to batch (`TensorLoader`):

- `split`: the validation blocks (the paper's split: whole square `val_block` blocks of the
  annotated area, drawn from `split_seed` until they hold `val_fraction` of the annotated
  pixels; their labels read 255 in every training batch), class counts, region masks.
  Slices named in `eval_slices` are held out altogether: never the centre of a patch,
  their labels never read, though their images may be read as slab context.
- `plans`: pure numpy `PatchPlan`s from (seed, step), so `batches(start_step=k)` after a
  restart yields exactly what an uninterrupted run would have yielded from step k on.
  Every process computes the whole global plan and reads only its share, rows
  [process_index * local : (process_index + 1) * local].
- `augment`: the symmetries (flips, quarter turns, slab reversal) and intensity jitter.
- `reader`: whole-batch tensorstore reads, worker threads, the background `Prefetcher`.

Unlabelled patches (`unlabelled_batch` > 0, for semi-supervised training): batch k also
holds patches centred on slices drawn uniformly from the whole stack, at uniform y-x
positions, from the same (seed, k) on a separate random stream. Only their images are
read, never a label. Each comes as two views with the same geometry: "weak" (normalised
only) and "strong" (with the intensity jitter).

Close the loader (or use it as a context manager) to stop its threads.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

import jax
import numpy as np
import tensorstore as ts

from fibseg_jax.data import lists, plans, split
from fibseg_jax.data import volume as volume_lib
from fibseg_jax.data.plans import PatchPlan
from fibseg_jax.data.reader import PatchReader, Prefetcher
from fibseg_jax.data.split import LoaderError

# Names callers import from here; each is defined in its own room.
__all__ = [
  "IGNORE_LABEL",
  "LoaderConfig",
  "LoaderError",
  "SlabLoader",
  "validate_config",
]

IGNORE_LABEL = volume_lib.IGNORE_LABEL

# Recipe fields checked as magnitudes (>= 0) and as probabilities ([0, 1]).
NON_NEGATIVE = (
  "rotation",
  "scale",
  "elastic",
  "drift",
  "noise",
  "blur",
  "curtain",
  "shading",
  "charging",
)
PROBABILITIES = ("spatial_p", "intensity_p", "artifact_p", "invert_gamma", "rare_fraction")

# The parts of the augmentation and sampling recipe with the magnitudes measured (the
# recipe ablation, `fibseg_jax.study.ablation`), as `LoaderConfig` fields; magnitudes and
# probabilities follow nnU-Net's defaults where it has the part.
RECIPE_PARTS: Mapping[str, Mapping[str, float]] = {
  "spatial": {"rotation": 180.0, "scale": 0.5, "elastic": 4.0, "spatial_p": 0.2},
  "intensity": {
    "noise": 0.1,
    "blur": 1.0,
    "contrast": 0.25,
    "lowres": 0.5,
    "invert_gamma": 0.1,
    "intensity_p": 0.15,
  },
  "artifacts": {"curtain": 0.3, "shading": 0.3, "charging": 0.3, "drift": 1.0, "artifact_p": 0.3},
  "rare_class": {"rare_fraction": 0.33},
}


@dataclasses.dataclass(frozen=True)
class LoaderConfig:
  """What the slab loader reads and how it augments.

  Attributes:
    channels: channel names to read, in model input order, e.g. ("ICE", "TLD").
    slices: slab depth S, odd; the label is that of the central slice.
    patch: y-x side of a patch in pixels; a multiple of `size_multiple`.
    batch_size: global batch size, summed over all processes.
    val_fraction: share of the annotated area held out for validation, in [0, 1); 0 holds
      none out (training needs some: `train.data_config.loader_config` asks for (0, 1)).
    val_block: side of the square y-x blocks of the validation split, in pixels.
    eval_slices: slices held out for evaluation: never trained or validated on.
    augment: master switch for every augmentation below.
    flips: random flips along y and x.
    rot90: random multiples of 90 degrees in the y-x plane.
    gain: per-channel multiplicative jitter; factor drawn from [1 - gain, 1 + gain].
    offset: per-channel additive jitter on the normalised image, from [-offset, offset].
    gamma: per-channel gamma jitter; exponent drawn from [1 - gamma, 1 + gamma].
    reverse_slab: randomly reverse the order of the slices of a slab.
    rotation: in-plane rotation by up to this many degrees either way (180: any angle);
      0 = none. Images resampled bilinearly, labels nearest (255 kept, outside the volume
      255), the same warp for every slice of a slab.
    scale: zoom by a factor drawn log-uniformly from [2**-scale, 2**scale] (0.5: about
      0.7-1.4); 0 = none.
    elastic: elastic deformation, a smooth displacement field of this magnitude in
      pixels (control points 32 px apart); 0 = none.
    spatial_p: probability of each of rotation, scaling and elastic deformation.
    drift: in-plane shift between consecutive slices of a slab, up to this many pixels
      per slice (a random walk out from the labelled centre slice); 0 = none.
    noise: additive Gaussian noise, standard deviation up to this (normalised units;
      the normalised range is about [-1, 1]); 0 = none.
    blur: Gaussian blur with sigma from [blur / 2, blur] pixels; 0 = none.
    contrast: contrast factor from [1 - contrast, 1 + contrast] about the mean; 0 = none.
    lowres: simulated low resolution: down by a factor from [1 - lowres, 1] and back up;
      0 = none.
    invert_gamma: probability that the gamma jitter bends the inverted image.
    intensity_p: probability of each of noise, blur, contrast and low resolution, per
      channel.
    curtain: depth of the FIB-SEM curtaining stripes (normalised units) along the
      milling direction (y), within 4 degrees; 0 = none.
    shading: amplitude of a smooth multiplicative detector-shading field; 0 = none.
    charging: brightness of charging streaks along the scan lines and bright patches;
      0 = none.
    artifact_p: probability of each of curtaining, shading and charging per channel
      (each detector on its own), and of drift per patch.
    rare_fraction: share of each batch's patches drawn class-balanced: a class uniformly
      among those with training pixels, then a cell by its pixels of that class (nnU-Net
      oversamples foreground in 33%); 0 = all by labelled area.
    seed: seed of the training stream (and of the split unless `split_seed` is set).
    split_seed: seed of the validation split; None uses `seed`. Fix it to compare
      models or seeds on the same held-out blocks.
    prefetch: batches read ahead by a background thread; 0 reads in the caller's thread.
    workers: threads that cast, normalise and augment the patches of a batch in parallel
      (numpy releases the GIL); 1 does it in the reading thread.
    size_multiple: the model's required multiple of the patch size (e.g. 2**depth).
    unlabelled_batch: global number of unlabelled patches per training batch, drawn
      from any slice of the stack (images only; no label is read); 0 draws none.
    teacher: a probabilities array [z, y, x, classes] uint8 (round(255 p), as `fibseg
      segment --probabilities` writes it) of the volume's shape and classes, read at the
      unlabelled patches (distillation); "" reads none.
    flag_names: field -> how the caller's command line spells it, for error messages;
      the data layer itself knows no flags.
  """

  channels: tuple[str, ...]
  slices: int
  patch: int
  batch_size: int
  val_fraction: float = 0.25
  val_block: int = 128
  eval_slices: tuple[int, ...] = ()
  augment: bool = True
  flips: bool = True
  rot90: bool = True
  gain: float = 0.1
  offset: float = 0.1
  gamma: float = 0.2
  reverse_slab: bool = True
  rotation: float = 0.0
  scale: float = 0.0
  elastic: float = 0.0
  spatial_p: float = 0.2
  drift: float = 0.0
  noise: float = 0.0
  blur: float = 0.0
  contrast: float = 0.0
  lowres: float = 0.0
  invert_gamma: float = 0.0
  intensity_p: float = 0.15
  curtain: float = 0.0
  shading: float = 0.0
  charging: float = 0.0
  artifact_p: float = 0.3
  rare_fraction: float = 0.0
  seed: int = 0
  split_seed: int | None = None
  prefetch: int = 2
  workers: int = 4
  size_multiple: int = 1
  unlabelled_batch: int = 0
  teacher: str = ""
  flag_names: Mapping[str, str] = dataclasses.field(default_factory=dict, compare=False)

  def flag(self, field: str) -> str:
    """How `field` is named in errors: as the caller spells it on its command line
    (`flag_names`, e.g. "--config.data.patch" from `train.data_config`), else the field."""
    return self.flag_names.get(field, field)

  def __post_init__(self):
    # Accept "ICE,TLD" and lists from a command line or a ConfigDict.
    channels = self.channels
    if isinstance(channels, str):
      channels = lists.parse_list(channels, str, flag=self.flag("channels"), error=LoaderError)
    object.__setattr__(self, "channels", tuple(channels))
    eval_slices = self.eval_slices
    if isinstance(eval_slices, int | str):
      eval_slices = lists.parse_list(
        eval_slices, int, flag=self.flag("eval_slices"), error=LoaderError
      )
    object.__setattr__(self, "eval_slices", tuple(eval_slices))


def open_teacher(config: LoaderConfig, volume: volume_lib.Volume) -> ts.TensorStore:
  """Opens `config.teacher` and checks it against the volume.

  Raises:
    LoaderError: no zarr v3 array there, or not [z, y, x, classes] uint8 of the volume's
      y-x-z shape and class count.
  """
  where = volume_lib.describe(config.teacher)
  flag = config.flag("teacher")
  try:
    array = ts.open(
      {"driver": "zarr3", "kvstore": volume_lib.kvstore_spec(config.teacher)},
      open=True,
      context=volume_lib.CONTEXT,
    ).result()
  except ValueError as e:
    reason = str(e).split(": {", 1)[0]
    raise LoaderError(f"{flag}: cannot open the teacher's probabilities {where}: {reason}") from e
  expected = (*volume.shape, len(volume.classes))
  if tuple(array.shape) != expected or array.dtype != ts.uint8:
    raise LoaderError(
      f"{flag}: the teacher's probabilities {where} are {list(array.shape)} {array.dtype.name}; "
      f"expected [z, y, x, classes] = {list(expected)} uint8 for {volume_lib.describe(volume.root)}"
    )
  return array


def _is_int(value: Any) -> bool:
  return isinstance(value, int | np.integer) and not isinstance(value, bool)


def _check_int(config: LoaderConfig, name: str, minimum: int) -> int:
  value = getattr(config, name)
  if not _is_int(value) or value < minimum:
    raise LoaderError(f"{config.flag(name)}={value!r}: must be an integer >= {minimum}")
  return int(value)


def validate_config(
  config: LoaderConfig, volume: volume_lib.Volume, process_count: int = 1
) -> list[int]:
  """Checks a loader config against a volume, without reading any voxel.

  Args:
    config: the loader settings.
    volume: the opened volume.
    process_count: number of JAX processes that share each global batch.

  Returns:
    The volume's channel indices of `config.channels`.

  Raises:
    LoaderError (a ValueError) or VolumeError: naming the flag, the volume and the
      expected value.
  """
  where = volume_lib.describe(volume.root)
  depth, height, width = volume.shape
  if not config.channels:
    raise LoaderError(f"{config.flag('channels')} is empty; name some of {list(volume.channels)}")
  if len(set(config.channels)) != len(config.channels):
    raise LoaderError(f"{config.flag('channels')}={list(config.channels)} names a channel twice")
  channel_index = volume.channel_indices(config.channels, flag=config.flag("channels"))

  slices = _check_int(config, "slices", 1)
  if slices % 2 == 0:
    raise LoaderError(f"{config.flag('slices')}={slices}: must be odd (1, 3, 5, ...)")

  multiple = _check_int(config, "size_multiple", 1)
  patch = _check_int(config, "patch", 1)
  if patch > min(height, width):
    raise LoaderError(
      f"{config.flag('patch')}={patch} is larger than the volume's y-x size ({height}, {width}) "
      f"of {where}"
    )
  if patch % multiple:
    below, above = patch // multiple * multiple, (patch // multiple + 1) * multiple
    nearest = [n for n in (below, above) if 0 < n <= min(height, width)]
    raise LoaderError(
      f"{config.flag('patch')}={patch} must be a multiple of {multiple} for this model "
      f"(nearest valid: {', '.join(map(str, nearest)) or 'none fits this volume'})"
    )

  batch = _check_int(config, "batch_size", 1)
  if batch % process_count:
    raise LoaderError(
      f"{config.flag('batch_size')}={batch} must be divisible by the number of processes "
      f"({process_count})"
    )

  unlabelled = _check_int(config, "unlabelled_batch", 0)
  if unlabelled % process_count:
    raise LoaderError(
      f"{config.flag('unlabelled_batch')}={unlabelled} must be divisible by the number of "
      f"processes ({process_count})"
    )

  fraction = config.val_fraction
  if not isinstance(fraction, int | float) or not 0 <= fraction < 1:
    raise LoaderError(f"{config.flag('val_fraction')}={fraction!r}: must be in [0, 1)")
  _check_int(config, "val_block", 1)
  _check_int(config, "prefetch", 0)
  _check_int(config, "workers", 1)
  for name in ("gain", "gamma"):
    value = getattr(config, name)
    if not isinstance(value, int | float) or not 0 <= value < 1:
      raise LoaderError(f"{config.flag(name)}={value!r}: must be in [0, 1)")
  for name in ("offset", *NON_NEGATIVE):
    value = getattr(config, name)
    if not isinstance(value, int | float) or not value >= 0:
      raise LoaderError(f"{config.flag(name)}={value!r}: must be >= 0")
  for name in (*PROBABILITIES, "lowres", "contrast"):
    value = getattr(config, name)
    if not isinstance(value, int | float) or not 0 <= value <= (
      1 if name in PROBABILITIES else 0.99
    ):
      high = "1]" if name in PROBABILITIES else "1)"
      raise LoaderError(f"{config.flag(name)}={value!r}: must be in [0, {high}")

  # config.eval_slices are z; messages give the user's slice numbers (the files').
  numbering = volume.metadata.numbering
  bad = [z for z in config.eval_slices if not _is_int(z) or not 0 <= z < depth]
  if bad:
    raise LoaderError(
      f"{config.flag('eval_slices')}: slice(s) {bad} outside the volume's slices "
      f"{numbering.describe()}"
    )
  annotated = set(volume.metadata.annotated_slices)
  given = numbering.text(config.eval_slices).replace(" ", "")
  unlabelled = [z for z in config.eval_slices if z not in annotated]
  if unlabelled:  # evaluating there would score against nothing
    which = (
      f"slice {numbering.label(unlabelled[0])} has"
      if len(unlabelled) == 1
      else f"slices {numbering.text(unlabelled)} have"
    )
    raise LoaderError(
      f"{config.flag('eval_slices')}={given}: {which} no labels; "
      + (
        f"annotated slices are {numbering.text(sorted(annotated))}"
        if annotated
        else f"volume {where} has no annotated slices"
      )
    )
  if not annotated - set(config.eval_slices):
    if not annotated:
      raise LoaderError(f"volume {where} has no annotated slices")
    raise LoaderError(
      f"volume {where} has no annotated slices outside {config.flag('eval_slices')}="
      f"{numbering.labels(config.eval_slices)} (annotated: {numbering.labels(sorted(annotated))})"
    )
  return channel_index


class SlabLoader:
  """Training and validation batches of slabs around the annotated slices of a volume.

  Construction validates the config against the volume and reads the labels of the
  annotated slices once (one slice at a time) to split them and count pixels; nothing
  else is kept in memory.

  Example:
    with SlabLoader(open_volume("vol.zarr"), config) as loader:
      weights = losses.class_weights(loader.class_counts())
      for step, batch in zip(range(start, steps), loader.batches(start_step=start)):
        ...  # batch["image"]: [local_batch, S, P, P, C], batch["labels"]: [local_batch, P, P]

  Attributes:
    config: the settings.
    volume: the volume read.
    process_index, process_count: this process and how many share each global batch.
    local_batch_size: rows of each batch read by this process.
    train_slices: annotated slices used for training and validation (eval slices left out).
    train_area, val_area: labelled training and validation pixels.
    split: the validation split (`split.Split`).
  """

  def __init__(
    self,
    volume: volume_lib.Volume | str,
    config: LoaderConfig,
    *,
    process_index: int | None = None,
    process_count: int | None = None,
  ):
    if not isinstance(volume, volume_lib.Volume):
      volume = volume_lib.open_volume(volume)
    self.volume = volume
    self.config = config
    self.process_count = jax.process_count() if process_count is None else int(process_count)
    self.process_index = jax.process_index() if process_index is None else int(process_index)
    if not 0 <= self.process_index < self.process_count:
      raise LoaderError(f"process_index={self.process_index} outside 0..{self.process_count - 1}")
    channel_index = validate_config(config, volume, self.process_count)
    self._where = volume_lib.describe(volume.root)
    self.local_batch_size = config.batch_size // self.process_count
    self.train_slices = tuple(
      sorted(set(volume.metadata.annotated_slices) - set(config.eval_slices))
    )
    self.split = split.Split(
      volume,
      self.train_slices,
      val_block=config.val_block,
      patch=config.patch,
      val_fraction=config.val_fraction,
      split_seed=config.seed if config.split_seed is None else config.split_seed,
      flag=config.flag,
    )
    self.train_area, self.val_area = self.split.train_area, self.split.val_area
    self._reader = PatchReader(
      volume,
      config.channels,
      channel_index,
      slices=config.slices,
      patch=config.patch,
      workers=config.workers,
      teacher=open_teacher(config, volume) if config.teacher else None,
    )
    self._open: set[Prefetcher] = set()
    self._validation_plan: PatchPlan | None = None

  # Summaries.

  def class_counts(self) -> np.ndarray:
    """[classes] int64 label histogram of the training pixels (validation blocks excluded)."""
    return self.split.class_counts()

  def validation_blocks(self) -> list[tuple[int, int, int, int, int]]:
    """The validation blocks as (z, y0, y1, x0, x1), in slice then raster order."""
    return self.split.validation_blocks()

  def split_masks(self) -> dict[int, np.ndarray]:
    """Region of every labelled pixel of the annotated slices (`split.Split.masks`)."""
    return self.split.masks(self.config.eval_slices)

  def summary(self) -> str:
    """One line for the log: slices, areas, split and batch shape."""
    c = self.config
    numbering = self.volume.metadata.numbering
    return (
      f"{self._where}: training slices {numbering.labels(self.train_slices)}, eval slices "
      f"{numbering.labels(c.eval_slices)}; {self.train_area} training and {self.val_area} "
      f"validation pixels ({self.val_area / (self.train_area + self.val_area):.1%} in "
      f"{int(self.split.val_blocks.sum())} blocks of {c.val_block} px); batch "
      f"{self.local_batch_size}/{c.batch_size} x {c.slices} slices x {c.patch}^2 x "
      f"{list(c.channels)}"
    )

  # Plans (`plans`).

  def train_plan(self, step: int) -> PatchPlan:
    """The global plan of training batch `step`: a pure function of (seed, step)."""
    return plans.train_plan(self.config, self.split, self.volume.shape, step)

  def unlabelled_plan(self, step: int) -> PatchPlan:
    """The global plan of the unlabelled patches of batch `step`: any slice, any place."""
    return plans.unlabelled_plan(self.config, self.volume.shape, step)

  def validation_plan(self) -> PatchPlan:
    """The tiling of the validation blocks, padded to whole global batches."""
    if self._validation_plan is None:
      c = self.config
      self._validation_plan = plans.validation_plan(
        self.validation_blocks(), self.volume.shape, c.patch, c.batch_size, len(c.channels)
      )
    return self._validation_plan

  @property
  def num_validation_batches(self) -> int:
    """Global batches in one pass of `validation_batches()`."""
    return len(self.validation_plan()) // self.config.batch_size

  def _share(self, plan: PatchPlan, first: int, local: int | None = None) -> PatchPlan:
    """This process's rows of the global batch starting at plan row `first`."""
    local = self.local_batch_size if local is None else local
    start = first + self.process_index * local
    return plan.rows(start, start + local)

  # Reading (`reader`).

  def read(self, plan: PatchPlan, *, validation: bool = False) -> dict[str, np.ndarray]:
    """Reads and augments the patches of a plan, all reads in one tensorstore batch.

    Args:
      plan: the patches, e.g. `train_plan(step)` (all rows) or a share of it.
      validation: keep validation-block labels (validation tiles); by default they are
        set to 255 as in training.

    Returns:
      {"image": float32 [n, slices, patch, patch, channels],
       "labels": uint8 [n, patch, patch], 255 = ignore}.
    """
    return self._reader.read(plan, None if validation else self.split)

  def read_unlabelled(self, plan: PatchPlan) -> dict[str, np.ndarray]:
    """The images of a plan, without any label, as a weak and a strong view.

    Returns:
      {"weak": float32 [n, slices, patch, patch, channels] normalised, moved by the plan's
       flips, turns and slab reversal; "strong": the same with the plan's intensity jitter}.
    """
    return self._reader.read_unlabelled(plan)

  def batches(self, start_step: int = 0) -> Iterator[dict[str, np.ndarray]]:
    """The endless training stream from global step `start_step`, this process's share.

    Yields:
      {"image": float32 [local_batch, slices, patch, patch, channels],
       "labels": uint8 [local_batch, patch, patch]}; validation-block and unannotated
      pixels are 255. With `unlabelled_batch` > 0 also "weak" and "strong":
      [unlabelled_batch / processes, slices, patch, patch, channels] (`read_unlabelled`).
    """
    if not _is_int(start_step) or start_step < 0:
      raise LoaderError(f"start_step={start_step!r}: must be an integer >= 0")
    unlabelled = self.config.unlabelled_batch // self.process_count

    def produce(step: int) -> dict[str, np.ndarray]:
      batch = self.read(self._share(self.train_plan(step), 0))
      if unlabelled:
        batch.update(self.read_unlabelled(self._share(self.unlabelled_plan(step), 0, unlabelled)))
      return batch

    return self._stream(produce, itertools.count(int(start_step)))

  def validation_batches(self) -> Iterator[dict[str, np.ndarray]]:
    """One pass over the validation tiles, this process's share of each global batch.

    Yields `num_validation_batches` dicts shaped like `batches()`; labels are 255
    outside each tile's own part of a validation block, and padding rows (to fill the
    last global batch) are all 255 with a zero image.
    """
    plan = self.validation_plan()
    return self._stream(
      lambda first: self.read(self._share(plan, first), validation=True),
      range(0, len(plan), self.config.batch_size),
    )

  def _stream(self, produce: Callable[[int], Any], keys: Iterable[int]) -> Iterator[Any]:
    if self.config.prefetch == 0:
      return map(produce, keys)
    self._open = {p for p in self._open if p.running}
    prefetcher = Prefetcher(produce, keys, self.config.prefetch)
    self._open.add(prefetcher)
    return prefetcher

  def close(self) -> None:
    """Stops every prefetch and worker thread started by this loader."""
    for prefetcher in self._open:
      prefetcher.close()
    self._open = set()
    self._reader.close()

  def __enter__(self) -> SlabLoader:
    return self

  def __exit__(self, *exc) -> None:
    self.close()


def split_regions(
  volume: volume_lib.Volume,
  *,
  eval_slices: Sequence[int] = (),
  val_fraction: float = 0.25,
  val_block: int = 128,
  split_seed: int = 0,
) -> tuple[tuple[int, ...], dict[int, np.ndarray]]:
  """The training loader's split of a volume, without a loader's patches.

  Args:
    volume: an opened volume with labels.
    eval_slices, val_fraction, val_block, split_seed: the run's split
      (`--config.data.*`).

  Returns:
    (training slices, {z: region [y, x] uint8 of `split.REGION_*`}), as a `SlabLoader`
    with these settings splits them.

  Raises:
    LoaderError / VolumeError: the split does not fit the volume.
  """
  _, height, width = volume.shape
  config = LoaderConfig(
    channels=(volume.channels[0],),
    slices=1,
    patch=min(val_block, height, width),
    batch_size=1,
    val_fraction=val_fraction,
    val_block=val_block,
    eval_slices=tuple(eval_slices),
    split_seed=split_seed,
    prefetch=0,
    workers=1,
  )
  with SlabLoader(volume, config, process_index=0, process_count=1) as loader:
    return loader.train_slices, loader.split_masks()
