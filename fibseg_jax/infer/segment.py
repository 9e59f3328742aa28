"""Sliding-window segmentation of every slice of a volume, memory bounded.

The volume is cut into blocks (one slice x up to `block` x `block` pixels, aligned to
the output chunks). For each block a background thread reads the slab region (the
block plus a halo of `overlap` pixels, reflected at the volume border, over `slices`
slices reflected at the stack ends) while the devices compute the previous one. Tiles
of the region go to the devices in batches; their softmax probabilities, weighted by a
blending window, are summed and divided by the summed window, and the block's labels
(argmax), optional probabilities and optional uncertainty (their normalised entropy)
are written. The block is then marked done, so a rerun resumes where an interrupted one
stopped. Ctrl-C stops after the block in progress, its writes and marker complete.

What is held at any time: the slices of one region (at most 2 x `slices` of them, the
read-ahead included, most shared), one accumulator [region_y, region_x, classes]
float32, the writes of two blocks in flight, and one batch of tiles with the model's
activations (set by --batch and --tile). None of it depends on the number of slices,
so memory does not grow with the volume. With the default 2048-pixel blocks, slices of
the paper's size (3868 x 4062, 2 channels) peak at about 0.8 GB for the whole process
with a per-pixel model; a U-Net adds its activations for one batch.
"""

from __future__ import annotations

import dataclasses
import math
import os
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from typing import Any

import flax
import flax.linen as nn
import jax
import numpy as np
import tensorstore as ts
from tqdm import tqdm

from fibseg_jax import checkpoint as checkpoint_lib
from fibseg_jax import interrupt, outputs
from fibseg_jax.data import volume as volume_lib
from fibseg_jax.infer import blend as blend_lib
from fibseg_jax.infer import predict, progress, store, tiling
from fibseg_jax.infer.blend import RegionBlender
from fibseg_jax.infer.reader import SlabReader
from fibseg_jax.infer.settings import (
  CHUNK_YX,
  COMPUTE_DTYPES,
  SegmentationResult,
  SegmentSettings,
)
from fibseg_jax.infer.tiling import Block, InferenceError
from fibseg_jax.progress import Bar

# Blocks whose writes may be in flight while the next block computes.
_WRITES_IN_FLIGHT = 2


def _barrier(name: str) -> None:
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # noqa: PLC0415 - multi-host runs only

    multihost_utils.sync_global_devices(name)


def _check_model(
  predictor: predict.TilePredictor,
  slices: int,
  channels: int,
  classes: Sequence[str],
  probe: int,
  checkpoint: str | None,
) -> None:
  """Checks, without running it, that the model maps a slab to logits of its classes."""
  try:
    out_shape = predictor.output_shape(slices, (probe, probe), channels)
  except (flax.errors.FlaxError, ValueError, TypeError) as e:
    where = f"checkpoint {checkpoint}" if checkpoint else "the given variables"
    raise InferenceError(
      f"the model cannot run on slabs [batch, {slices}, y, x, {channels}] with {where}: {e}"
    ) from e
  if out_shape[1:3] != (probe, probe):
    raise InferenceError(
      f"model maps tiles of {(probe, probe)} to {out_shape[1:3]}; segmentation needs logits "
      "[batch, y, x, classes] of the input's y and x"
    )
  if out_shape[-1] != len(classes):
    raise InferenceError(
      f"model predicts {out_shape[-1]} classes but {len(classes)} class names were given "
      f"({list(classes)})"
    )


def _open_outputs(
  output: Any,
  probabilities: Any,
  plan: store.OutputPlan,
  shape: Sequence[int],
  classes: Sequence[str],
  run: Mapping[str, Any],
  chunk_yx: int,
  process_index: int,
  uncertainty: Any = None,
) -> store.SegmentationOutput:
  """Process 0 creates (or replaces) the outputs; the others open them after it."""
  kwargs = dict(
    plan=plan, shape=shape, classes=classes, run=run, chunk_yx=chunk_yx, uncertainty=uncertainty
  )
  out = store.open_output(output, probabilities, **kwargs) if process_index == 0 else None
  _barrier("fibseg_jax.infer.output_created")
  if out is None:
    out = store.open_output(output, probabilities, may_delete=False, **kwargs)
  return out


def segment_volume(
  volume: volume_lib.Volume | Any,
  model: nn.Module,
  variables: Mapping[str, Any],
  *,
  channels: Sequence[str],
  slices: int,
  output: Any,
  probabilities: Any | None = None,
  uncertainty: Any | None = None,
  classes: Sequence[str] | None = None,
  size_multiple: int = 1,
  checkpoint: str | None = None,
  train_patch: int | None = None,
  settings: SegmentSettings | None = None,
  stop: threading.Event | None = None,
) -> SegmentationResult:
  """Segments every slice of a volume into a zarr v3 label array.

  Args:
    volume: an opened `Volume` or its root (path, ``memory://name``, ...).
    model: flax module mapping a slab batch `[batch, slices, y, x, channels]` (float32,
      normalised) to logits `[batch, y, x, classes]` of the central slice.
    variables: the model's variables ({'params': ..., maybe 'batch_stats': ...}).
    channels: volume channel names the model takes, in its order, e.g. ("ICE", "TLD").
    slices: odd slab depth the model takes.
    output: path of the labels array [z, y, x] uint8 (the path is the array).
    probabilities: optional path of a [z, y, x, classes] uint8 array, round(255 * p).
    uncertainty: optional path of a [z, y, x] uint8 array, round(255 * entropy(p) /
      log(classes)) of the blended probabilities p: 0 = certain, 255 = uniform.
    classes: class names, one per model output; default the volume's classes.
    size_multiple: the model's y and x must be multiples of this (2**depth).
    checkpoint: where the model came from, stored in the output attributes.
    train_patch: the y-x side of the training patches of a model that normalises each
      tile on its own (instance or group norm), or None (no such model, or unknown). A
      `settings.tile` below it is refused rather than warned about: such tiles feed the
      norm other statistics than training did, and the labels change without any sign
      of it. Tiles that the volume or the block bound anyway are not refused.
    settings: tiling, TTA passes, slices, overwrite, progress and process share; default
      `SegmentSettings()`. Its `dtype` must be None here (the model runs as given).
    stop: setting it from another thread (a GUI's Cancel) stops as a Ctrl-C does, after
      the block in progress, raising KeyboardInterrupt; a rerun resumes.

  Returns:
    A `SegmentationResult`.

  Raises:
    InferenceError: a flag value the model or volume cannot take (missing channel,
      tile not a multiple of the size multiple or below `train_patch`, wrong number of
      classes, ...).
    KeyboardInterrupt: Ctrl-C, with a one-line message: the block in progress is
      finished, it and the blocks before it written and marked done ("stopped after N
      of M blocks; rerun the same command to resume"); a second Ctrl-C while a block
      is computed stops at once, leaving that block to the rerun.
    store.OutputError: the output exists and is complete, belongs to another run, or
      is something else.
    VolumeError: the volume cannot be opened.
  """
  settings = SegmentSettings() if settings is None else settings
  if settings.dtype is not None:
    raise InferenceError(
      f"settings.dtype={settings.dtype}: segment_volume runs the model it is given; build "
      "it in that dtype, or segment with segment_from_checkpoint"
    )
  tile, overlap, batch, block = settings.tile, settings.overlap, settings.batch, settings.block
  window, tta, only_slices = settings.window, settings.tta, settings.only_slices
  overwrite, show_progress = settings.overwrite, settings.progress
  if not isinstance(volume, volume_lib.Volume):
    volume = volume_lib.open_volume(volume, check_labels=False)
  process_index, process_count = settings.process_index, settings.process_count
  process_index = jax.process_index() if process_index is None else int(process_index)
  process_count = jax.process_count() if process_count is None else int(process_count)
  channels = tuple(channels)
  classes = tuple(volume.classes if classes is None else classes)

  # Everything a user can get wrong is checked before anything is compiled or written.
  if slices < 1 or slices % 2 == 0:
    raise InferenceError(f"slices={slices} must be odd (the model's slab depth)")
  tiling.check_tiling(tile, overlap, size_multiple)
  tiling.check_tile_against_training(
    tile, train_patch, volume.shape[1:], block, overlap, checkpoint
  )
  if block < 1 or (block > CHUNK_YX and block % CHUNK_YX):
    raise InferenceError(f"--block={block} must be at most {CHUNK_YX} or a multiple of it")
  if not classes:
    raise InferenceError("classes: the model's class names are unknown (empty)")
  channel_indices = volume.channel_indices(channels, flag="the model's channels")
  offset, scale = volume.normalization(channels)
  predictor = predict.TilePredictor(
    model,
    variables,
    offset=offset,
    scale=scale,
    overlap=overlap,
    window=window,
    batch=batch,
    devices=settings.devices,
    tta=tta,
  )
  _check_model(predictor, slices, len(channels), classes, min(tile, size_multiple * 4), checkpoint)
  run = {
    "source": store.source_id(volume.root),
    "shape": list(volume.shape),
    "classes": list(classes),
    "channels": list(channels),
    "slices": int(slices),
    "checkpoint": checkpoint,
    "tile": int(tile),
    "overlap": int(overlap),
    "window": window,
    "block": int(block),
    "probabilities": probabilities is not None,
    "voxel_size_nm": list(volume.metadata.voxel_size_nm),
  }
  if uncertainty is not None:  # only when asked for, so earlier runs' outputs still resume
    run["uncertainty"] = True
  # Only when on, so outputs of runs before the option still resume: True for every
  # pass (as records before pass counts), else the count.
  passes = min(predictor.passes, len(predict.tta_transforms((tile, tile), slices)))
  if passes > 1:
    run["tta"] = True if passes == len(predict.tta_transforms((tile, tile), slices)) else passes
  blocks = tiling.plan_blocks(volume.shape, block)
  if only_slices is not None:
    chosen = sorted({int(z) for z in only_slices})
    outside = [z for z in chosen if not 0 <= z < volume.shape[0]]
    if not chosen or outside:
      raise InferenceError(
        f"--slices={','.join(map(str, chosen))}: expected slices within 0..{volume.shape[0] - 1}"
      )
    run["only_slices"] = chosen
    blocks = [b for b in blocks if b.z in set(chosen)]
  mine = tiling.assign_blocks(blocks, process_index, process_count)
  plan = store.plan_output(
    output,
    probabilities,
    run=run,
    all_keys=[b.key for b in blocks],
    source=volume.root,
    overwrite=overwrite,
    uncertainty=uncertainty,
  )
  # Every process decides from the store as it was; only then may process 0 change it
  # (else another process can find a half-created array and refuse it).
  _barrier("fibseg_jax.infer.output_planned")
  out = _open_outputs(
    output,
    probabilities,
    plan,
    volume.shape,
    classes,
    run,
    min(block, CHUNK_YX),
    process_index,
    uncertainty=uncertainty,
  )
  todo = [b for b in mine if b.key not in out.done]
  skipped = len(mine) - len(todo)

  start = time.perf_counter()
  # Pixels with SI prefixes (874px/s, 87.4kpx/s, 2.10Mpx/s): readable however slow the
  # model; the blocks done are the postfix.
  bar = Bar(
    total=sum(b.pixels for b in todo),
    unit="px",
    unit_scale=True,
    disable=not show_progress,
    desc=f"segment {volume_lib.describe(output)}",
    bar_format="{l_bar}{bar}| {n_fmt}/{total_fmt}px [{elapsed}<{remaining}, {rate_noinv_fmt}"
    "{postfix}]",
    postfix=f"0/{len(todo)} blocks",
  )
  in_flight: list[tuple[Block, list[ts.Future]]] = []
  finished = 0  # blocks of this call with their done-marker

  def finish(keep: int) -> None:
    nonlocal finished
    while len(in_flight) > keep:
      done_block, futures = in_flight.pop(0)
      for f in futures:
        f.result()
      out.mark_done(done_block.key).result()
      finished += 1
      bar.set_postfix_str(f"{finished}/{len(todo)} blocks", refresh=False)
      bar.update(done_block.pixels)

  reader = SlabReader(
    volume,
    todo,
    channel_indices=channel_indices,
    slices=slices,
    halo=overlap,
    tile=tile,
    size_multiple=size_multiple,
    min_tile=train_patch or 0,
  )
  # Labels alone need no normalised probabilities: argmax of the weighted sums is theirs.
  needs_probabilities = probabilities is not None or uncertainty is not None
  blend = RegionBlender(predictor, overlap, normalise=needs_probabilities)
  with interrupt.StopRequest(
    first="stopping after the block in progress (Ctrl-C again: stop now)",
    protected="finishing the writes of the blocks done, then stopping",
    event=stop,
  ) as stop:
    estimated = 0  # blocks the time of all was foretold from (first, then second)
    previous = start
    try:
      for blk, geom, slab in reader:
        if stop.requested:
          break
        probs = blend(slab, geom.tile_yx)
        cy, cx = geom.crop
        probs = probs[cy : cy + blk.y1 - blk.y0, cx : cx + blk.x1 - blk.x0]
        labels = np.argmax(probs, axis=-1).astype(np.uint8)
        futures = [out.labels[blk.z, blk.y0 : blk.y1, blk.x0 : blk.x1].write(labels)]
        if out.probabilities is not None:
          futures.append(
            out.probabilities[blk.z, blk.y0 : blk.y1, blk.x0 : blk.x1].write(
              blend_lib.to_uint8_probabilities(probs)
            )
          )
        if out.uncertainty is not None:
          futures.append(
            out.uncertainty[blk.z, blk.y0 : blk.y1, blk.x0 : blk.x1].write(
              blend_lib.to_uint8_uncertainty(probs)
            )
          )
        in_flight.append((blk, futures))
        now = time.perf_counter()
        if show_progress and estimated < 2 and len(todo) > estimated + 1:
          # The first block's time includes compiling; the second tells the steady rate.
          rest = todo[estimated:]
          tqdm.write(progress.estimate(now - previous, blk, rest, estimated), file=sys.stderr)
          estimated += 1
        previous = now
        if stop.requested:
          break
        finish(keep=_WRITES_IN_FLIGHT)
        progress.release_free_memory()
      with stop.protected():
        finish(keep=0)
    except KeyboardInterrupt:
      with stop.protected():
        finish(keep=0)  # the blocks computed before it keep their work
      raise KeyboardInterrupt(
        f"stopped after {skipped + finished} of {len(mine)} blocks (the block in progress "
        "abandoned); rerun the same command to resume"
      ) from None
    except Exception as e:
      if not outputs.is_disk_full(e):
        raise
      for _, futures in in_flight:  # nothing may still be writing when we return
        for f in futures:
          try:
            f.result()
          except Exception:  # noqa: BLE001 - already failing; these blocks are redone
            pass
      paths = [p for p in (output, probabilities, uncertainty) if p is not None]
      per_pixel = 2 + (len(classes) if probabilities is not None else 0)  # labels + uncertainty
      remaining = sum(b.pixels for b in todo[finished:])
      done_pixels = sum(b.pixels for b in mine) - remaining
      raise store.disk_full_error(
        paths, skipped + finished, done_pixels, remaining, per_pixel
      ) from e
    finally:
      reader.close()
      bar.close()
  if stop.requested and finished < len(todo):
    raise KeyboardInterrupt(
      f"stopped after {skipped + finished} of {len(mine)} blocks; rerun the same command to resume"
    )
  seconds = time.perf_counter() - start
  complete = {b.key for b in blocks} <= out.finished_keys()
  return SegmentationResult(
    output=output,
    probabilities=probabilities,
    blocks_total=len(blocks),
    blocks_assigned=len(mine),
    blocks_skipped=skipped,
    blocks_done=len(todo),
    complete=complete,
    seconds=seconds,
    mpixels=sum(b.pixels for b in todo) / 1e6,
    segmented=tuple(b.key for b in todo),
    uncertainty=uncertainty,
  )


def segment_from_checkpoint(
  checkpoint: str | Sequence[str],
  volume: volume_lib.Volume | Any,
  *,
  output: Any,
  probabilities: Any | None = None,
  uncertainty: Any | None = None,
  settings: SegmentSettings | None = None,
  stop: threading.Event | None = None,
) -> SegmentationResult:
  """`segment_volume` with the model, channels, slab depth and classes of a checkpoint.

  Args:
    checkpoint: a training workdir, its checkpoints/ directory or one step directory
      (the best checkpoint by validation mIoU of a workdir is used); or several, whose
      class probabilities are averaged (a checkpoint or seed ensemble: they must take the
      same channels and slab depth and predict the same classes).
    volume: an opened `Volume` or its root.
    output: path of the labels array.
    probabilities: optional path of the probabilities array (see `segment_volume`).
    uncertainty: optional path of the uncertainty array (see `segment_volume`).
    settings: as for `segment_volume`; its `dtype` ("float32" or "bfloat16") runs the
      models in that compute dtype instead of the one they were trained with.
    stop: see `segment_volume`.

  Raises:
    checkpoint.CheckpointError: not a checkpoint.
    InferenceError: the volume lacks a channel the model needs, the checkpoint records
      no class names, or ensemble members disagree on channels, slices or classes.
    See `segment_volume` for the rest.
  """
  settings = SegmentSettings() if settings is None else settings
  dtype = settings.dtype
  paths = [checkpoint] if isinstance(checkpoint, str | os.PathLike) else list(checkpoint)
  if not paths:
    raise InferenceError("--workdir: give at least one training workdir or checkpoint")
  if dtype is not None and dtype not in COMPUTE_DTYPES:
    raise InferenceError(f"--dtype={dtype}: expected one of {', '.join(COMPUTE_DTYPES)}")
  members = [checkpoint_lib.load(os.fspath(p)) for p in paths]
  restored = members[0]
  for other in members[1:]:
    for what in ("channels", "slices", "classes"):
      if getattr(other, what) != getattr(restored, what):
        raise InferenceError(
          f"ensemble members disagree on {what}: {restored.path} has "
          f"{getattr(restored, what)}, {other.path} has {getattr(other, what)}"
        )
  if not isinstance(volume, volume_lib.Volume):
    volume = volume_lib.open_volume(volume, check_labels=False)
  missing = [c for c in restored.channels if c not in volume.channels]
  if missing:
    raise InferenceError(
      f"--input={volume_lib.describe(volume.root)} lacks channel(s) {missing} that the model "
      f"of {restored.path} needs (it takes {list(restored.channels)}; the volume has "
      f"{list(volume.channels)})"
    )
  if not restored.classes:
    raise InferenceError(f"checkpoint {restored.path} records no class names (data.classes)")

  def in_dtype(model: nn.Module) -> nn.Module:
    if dtype is None or dtype == model.config.dtype:
      return model
    return model.clone(config=dataclasses.replace(model.config, dtype=dtype))

  # Batch norm at inference uses its running statistics: any tile size sees the same.
  patches = [m.settings.data.patch for m in members if m.model.config.norm in ("instance", "group")]
  train_patch = max(patches, default=None)
  if len(members) == 1:
    model, variables = in_dtype(restored.model), restored.variables
  else:
    model = predict.Ensemble([in_dtype(m.model) for m in members])
    variables = tuple(m.variables for m in members)
  return segment_volume(
    volume,
    model,
    variables,
    channels=restored.channels,
    slices=restored.slices,
    classes=restored.classes,
    size_multiple=math.lcm(*(m.size_multiple for m in members)),
    checkpoint=",".join(m.path for m in members),
    output=output,
    probabilities=probabilities,
    uncertainty=uncertainty,
    train_patch=train_patch,
    settings=dataclasses.replace(settings, dtype=None),
    stop=stop,
  )
