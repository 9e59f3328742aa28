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

import itertools
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import jax
import numpy as np
import tensorstore as ts

from fibseg_jax.data import plans, split
from fibseg_jax.data import volume as volume_lib
from fibseg_jax.data.loader_config import (
  NON_NEGATIVE,
  PROBABILITIES,
  RECIPE_PARTS,
  LoaderConfig,
)
from fibseg_jax.data.plans import PatchPlan
from fibseg_jax.data.reader import PatchReader, Prefetcher
from fibseg_jax.data.split import LoaderError

# Names callers import from here; each is defined in its own room.
__all__ = [
  "IGNORE_LABEL",
  "LoaderConfig",
  "LoaderError",
  "NON_NEGATIVE",
  "PROBABILITIES",
  "RECIPE_PARTS",
  "SlabLoader",
  "validate_config",
]

IGNORE_LABEL = volume_lib.IGNORE_LABEL


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
