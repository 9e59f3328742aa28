"""The teacher of a distilled student: its class probabilities over the whole stack.

`prepare_teacher(config, workdir)` segments the training volume once with the teacher's
checkpoints (`config.distill.teacher`, averaged as an ensemble, with its test-time
augmentation `config.distill.tta`), out of core and resumable like any segmentation,
into `WORKDIR/teacher/probabilities.zarr` (uint8 round(255 p)); the training loop then
reads that array at its patches (`fibseg_jax.train.distill`). Only images are read:
no label of any slice, so the evaluation slices' labels stay unseen.

  config = configs.load("unet"); config.data.path = "vol.zarr"
  config.distill.teacher = "runs/s0,runs/s1,runs/s2"
  infer.distill.prepare_teacher(config, "runs/student")
  train.train_and_evaluate(config, "runs/student")
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from typing import Any

import jax
import tensorstore as ts

from fibseg_jax import baselines
from fibseg_jax import checkpoint as checkpoint_lib
from fibseg_jax.data import loader as loader_lib
from fibseg_jax.data import volume as volume_lib
from fibseg_jax.infer import segment, store, tiling
from fibseg_jax.infer.settings import SegmentSettings
from fibseg_jax.train import config as config_lib
from fibseg_jax.train import distill as distill_lib
from fibseg_jax.train import loop
from fibseg_jax.train.config import ConfigError


def _record(distilled: distill_lib.Distill, volume: str) -> dict[str, Any]:
  return {
    "members": [os.path.realpath(m) for m in distilled.members],
    "tta": distilled.tta,
    "volume": os.path.realpath(volume_lib.local_path(volume) or volume),
  }


def _complete(labels: str, shape, block: int) -> bool:
  if store.read_array_metadata(labels) is None:
    return False
  kv = ts.KvStore.open(volume_lib.kvstore_spec(labels), context=volume_lib.CONTEXT).result()
  return {b.key for b in tiling.plan_blocks(shape, block)} <= store.list_done(kv)


def prepare_teacher(
  config: Any,
  workdir: str,
  *,
  settings: SegmentSettings | None = None,
  progress: bool = True,
) -> str | None:
  """Computes (or finishes) the teacher's probabilities of a student in `workdir`.

  Args:
    config: the student's experiment config.
    workdir: the student's training workdir.
    settings: tiling of the teacher's segmentation (default `SegmentSettings()`); its
      `tta` is replaced by `config.distill.tta`.
    progress: show the segmentation's progress bar.

  Returns:
    The probabilities array the loader reads, or None when distillation is off. An
    array given as the teacher is returned as it is.

  Raises:
    ConfigError: a bad `config.distill` field, a teacher that cannot segment the
      volume (other channels, classes), or a workdir whose teacher was computed from
      other checkpoints.
  """
  experiment = config_lib.parse(config)  # where the ConfigDict enters: typed once
  distilled = distill_lib.settings(experiment.distill, workdir)
  if distilled is None or not distilled.computed:
    return None if distilled is None else distilled.array
  loop.claim_workdir(experiment, workdir)  # before the teacher is written into it
  path = experiment.data.path
  try:
    volume = volume_lib.open_volume(path, check_labels=False)
  except volume_lib.VolumeError as e:
    raise ConfigError(f"--config.data.path: {e}") from None
  folder = os.path.join(workdir, distill_lib.TEACHER_DIR)
  labels = os.path.join(folder, distill_lib.LABELS)
  record_path = os.path.join(folder, distill_lib.RECORD)
  record = _record(distilled, path) if not distilled.route else _route_record(experiment)
  if os.path.isfile(record_path):
    with open(record_path) as f:
      theirs = json.load(f)
    if theirs != record:
      raise ConfigError(
        f"--workdir={workdir} holds a teacher computed from {_describe(theirs)}; "
        f"--config.distill.teacher now asks for {_describe(record)}: use a new --workdir"
      )
  if distilled.route:
    return _route_teacher(volume, distilled, record, record_path, progress)
  settings = SegmentSettings() if settings is None else settings
  settings = _with_tta(settings, distilled.tta)
  if _complete(labels, volume.shape, settings.block):
    return distilled.array
  os.makedirs(folder, exist_ok=True)
  if jax.process_index() == 0 and not os.path.isfile(record_path):
    with open(record_path, "w") as f:
      json.dump(record, f, indent=1)
  try:
    restored = [checkpoint_lib.load(m) for m in distilled.members]
  except checkpoint_lib.CheckpointError as e:
    raise ConfigError(f"--config.distill.teacher: {e}") from None
  if any(tuple(r.classes) != tuple(volume.classes) for r in restored):
    raise ConfigError(
      f"--config.distill.teacher: the teacher predicts {list(restored[0].classes)}, the "
      f"volume {path} has classes {list(volume.classes)}; a teacher must predict the "
      "student's classes"
    )
  if progress:
    print(
      f"distill: the teacher's probabilities ({len(restored)} model(s), TTA "
      f"{distilled.tta}) over {volume.shape[0]} slices -> {distilled.array}",
      file=sys.stderr,
      flush=True,
    )
  try:
    segment.segment_from_checkpoint(
      list(distilled.members),
      volume,
      output=labels,
      probabilities=distilled.array,
      settings=dataclasses.replace(settings, progress=progress),
    )
  except (tiling.InferenceError, store.OutputError, volume_lib.VolumeError) as e:
    raise ConfigError(f"--config.distill.teacher: {e}") from None
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # noqa: PLC0415 - multi-host runs only

    multihost_utils.sync_global_devices("fibseg_jax.infer.distill.teacher")
  return distilled.array


def _describe(record: dict[str, Any]) -> str:
  """A teacher record in words: what it was computed from, and on which volume."""
  how = f"tta {record.get('tta')}" if "tta" in record else f"seed {record.get('seed')}"
  return f"{record.get('members')} ({how}) on {record.get('volume')}"


def _route_record(settings: config_lib.Settings) -> dict[str, Any]:
  """What a forest teacher depends on: the pixels it is fitted on and its seed."""
  d = settings.data
  return {
    "members": [distill_lib.FOREST],
    "forest": baselines.ForestConfig().to_json(),
    "seed": settings.train.seed,
    "channels": list(d.channels),
    "split": {
      "eval_slices": sorted(d.eval_slices),
      "val_fraction": d.val_fraction,
      "val_block": d.val_block,
      "split_seed": d.split_seed,
    },
    "volume": os.path.realpath(volume_lib.local_path(d.path) or d.path),
  }


def _route_teacher(
  volume: volume_lib.Volume,
  distilled: distill_lib.Distill,
  record: dict[str, Any],
  record_path: str,
  progress: bool,
) -> str:
  """Fits the forest on the run's training pixels (`_route_record`) and writes its
  probabilities."""
  if distill_lib.is_probabilities_array(distilled.array):
    return distilled.array  # written whole (moved into place when complete)
  if jax.process_index() == 0:
    os.makedirs(os.path.dirname(record_path), exist_ok=True)
    with open(record_path, "w") as f:
      json.dump(record, f, indent=1)
    split = record["split"]
    try:
      images, labels = baselines.training_slices(
        volume,
        record["channels"],
        # The record keeps the user's slice numbers; the split takes z.
        eval_slices=volume.metadata.numbering.to_zs(
          split["eval_slices"], "--config.data.eval_slices"
        ),
        val_fraction=split["val_fraction"],
        val_block=split["val_block"],
        split_seed=split["split_seed"],
      )
    except (loader_lib.LoaderError, volume_lib.VolumeError) as e:
      raise ConfigError(f"--config.distill.teacher={distill_lib.FOREST}: {e}") from None
    route = baselines.make_route(
      "forest", len(volume.classes), seed=record["seed"], forest=baselines.ForestConfig()
    )
    if progress:
      print(
        f"distill: fitting a random forest on the training pixels of {len(images)} slice(s); "
        f"its probabilities over {volume.shape[0]} slices -> {distilled.array}",
        file=sys.stderr,
        flush=True,
      )
    try:
      route.fit(list(images.values()), list(labels.values()))
    except ValueError as e:
      raise ConfigError(f"--config.distill.teacher={distill_lib.FOREST}: {e}") from None
    baselines.write_probabilities(
      route, volume, record["channels"], distilled.array, progress=progress
    )
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # noqa: PLC0415 - multi-host runs only

    multihost_utils.sync_global_devices("fibseg_jax.infer.distill.forest")
  return distilled.array


def _with_tta(settings: SegmentSettings, tta: str) -> SegmentSettings:
  """`settings` with the teacher's TTA (`--config.distill.tta`, segment's --tta values)."""
  try:
    return dataclasses.replace(settings, tta=tta)
  except tiling.InferenceError as e:
    raise ConfigError(f"--config.distill.tta={tta}: {e}") from None
