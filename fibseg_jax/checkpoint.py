"""Orbax checkpoints of a training run, and loading one back for prediction.

A workdir holds ``checkpoints/<step>/`` directories, each with three items:
``state`` (the TrainState pytree), ``config`` (the whole experiment config as JSON, so a
checkpoint alone rebuilds its model) and ``loader`` (the data position as JSON).
The latest `keep` checkpoints and the best by validation mean IoU are preserved.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
from collections.abc import Iterator, Mapping
from typing import Any

import jax
import ml_collections
import orbax.checkpoint as ocp
from flax import serialization
from orbax.checkpoint import checkpoint_managers

from fibseg_jax import models
from fibseg_jax.train import config as config_lib

ITEMS = ("state", "config", "loader")
BEST_METRIC = "val_miou"
CHECKPOINT_DIR = "checkpoints"


# What orbax warns about on an ordinary read-only open or load of a healthy checkpoint,
# and on a save without validation metrics (Ctrl-C); a user reads them as a corrupt
# checkpoint. Item directories (``<step>/state``) never hold the metadata file: the step
# directory does.
_ROUTINE_ORBAX_WARNINGS = (
  "Given directory is read only",
  "Metadata file does not exist",
  "Requested `tracked_metric`; did not provide metrics",
)


class CheckpointError(ValueError):
  """A path that is not a checkpoint, or a checkpoint that does not fit the run."""


class _RoutineOrbaxWarnings(logging.Filter):
  """Drops the warnings of `_ROUTINE_ORBAX_WARNINGS` that orbax itself logs, nothing else."""

  def filter(self, record: logging.LogRecord) -> bool:
    routine = (
      record.levelno == logging.WARNING
      and f"{os.sep}orbax{os.sep}" in record.pathname
      and str(record.msg).startswith(_ROUTINE_ORBAX_WARNINGS)
    )
    return not routine


_ROUTINE_FILTER = _RoutineOrbaxWarnings()


@contextlib.contextmanager
def _without_routine_warnings() -> Iterator[None]:
  """Silences orbax's routine warnings (it logs through absl, logger "absl") meanwhile."""
  logger = logging.getLogger("absl")
  logger.addFilter(_ROUTINE_FILTER)
  try:
    yield
  finally:
    logger.removeFilter(_ROUTINE_FILTER)


def _best_fn(metrics: Mapping[str, float]) -> float:
  return float(metrics.get(BEST_METRIC, float("-inf")))


def manager(directory: str, *, keep: int = 3, read_only: bool = False) -> ocp.CheckpointManager:
  """A CheckpointManager keeping the latest `keep` and the best by validation mIoU.

  Args:
    directory: the checkpoints directory (``<workdir>/checkpoints``).
    keep: how many of the latest checkpoints to keep.
    read_only: open without creating or deleting anything.
  """
  preservation = checkpoint_managers.AnyPreservationPolicy(
    [
      checkpoint_managers.LatestN(keep),
      checkpoint_managers.BestN(
        get_metric_fn=_best_fn, reverse=False, n=1, keep_checkpoints_without_metrics=False
      ),
    ]
  )
  options = ocp.CheckpointManagerOptions(
    preservation_policy=None if read_only else preservation,
    best_fn=_best_fn,
    best_mode="max",
    create=not read_only,
    read_only=read_only,
    # Read-only takes no saves; saying so spares orbax's warning that it changed it.
    save_interval_steps=0 if read_only else 1,
    # Saves happen at validation steps only; synchronous saves keep the failure
    # story simple (a step directory exists only once it is complete).
    enable_async_checkpointing=False,
  )
  with _without_routine_warnings():
    return ocp.CheckpointManager(os.path.abspath(directory), options=options, item_names=ITEMS)


def save(
  mngr: ocp.CheckpointManager,
  step: int,
  state: Any,
  config: ml_collections.ConfigDict,
  loader_state: Mapping[str, Any],
  metrics: Mapping[str, float] | None = None,
) -> None:
  """Saves one checkpoint and waits until it is complete on disk.

  All processes must call it; orbax writes from process 0 into a temporary directory
  and finalises it only once complete, so a save cut short never passes for a checkpoint.

  Args:
    mngr: from `manager`.
    step: the training step.
    state: the TrainState pytree.
    config: the whole experiment config.
    loader_state: the data position, JSON.
    metrics: validation metrics; None for a checkpoint saved between validations (on
      Ctrl-C), which counts among the latest but never as the best.
  """
  with _without_routine_warnings():
    mngr.save(
      step,
      args=ocp.args.Composite(
        state=ocp.args.StandardSave(state),
        config=ocp.args.JsonSave(config.to_dict()),
        loader=ocp.args.JsonSave(dict(loader_state)),
      ),
      metrics=dict(metrics) if metrics else None,
      force=True,
    )
    mngr.wait_until_finished()


def restore(mngr: ocp.CheckpointManager, step: int, abstract_state: Any | None = None):
  """Restores (state, config dict, loader dict) of `step`; state against `abstract_state`.

  Checkpoints written before `TrainState.teacher` existed restore into a state with an
  empty teacher (a supervised run), so their workdirs still resume.
  """

  def attempt(target):
    state_args = (
      ocp.args.StandardRestore(target) if target is not None else ocp.args.StandardRestore()
    )
    return mngr.restore(
      step,
      args=ocp.args.Composite(
        state=state_args, config=ocp.args.JsonRestore(), loader=ocp.args.JsonRestore()
      ),
    )

  try:
    restored = attempt(abstract_state)
    state = restored.state
  except ValueError as e:
    if getattr(abstract_state, "teacher", None) != {} or "teacher" not in str(e):
      raise
    fields = serialization.to_state_dict(abstract_state)
    del fields["teacher"]
    restored = attempt(fields)
    state = serialization.from_state_dict(abstract_state, {**restored.state, "teacher": {}})
  return state, restored.config, restored.loader


def read_config(mngr: ocp.CheckpointManager, step: int) -> dict[str, Any]:
  """The saved config of `step`, without touching the state."""
  restored = mngr.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))
  return restored.config


@dataclasses.dataclass(frozen=True)
class Restored:
  """What research code needs to predict with a trained model.

  Attributes:
    model: the flax module; `model.apply(variables, x, train=False)` maps a slab batch
      `[batch, slices, y, x, channels]` to logits `[batch, y, x, classes]`.
    variables: {'params': ..., 'batch_stats': ...} (batch_stats only when the model has it).
    config: the whole experiment config, as saved.
    step: the training step of the checkpoint.
    path: the checkpoint step directory.
    settings: the config typed (`train.config.parse`); None parses `config`.
  """

  model: Any
  variables: dict[str, Any]
  config: ml_collections.ConfigDict
  step: int
  path: str
  settings: config_lib.Settings | None = None

  def __post_init__(self):
    if self.settings is None:
      object.__setattr__(self, "settings", config_lib.parse(self.config))

  @property
  def channels(self) -> tuple[str, ...]:
    return self.settings.data.channels

  @property
  def slices(self) -> int:
    return self.settings.data.slices

  @property
  def classes(self) -> tuple[str, ...]:
    return self.settings.data.classes

  @property
  def size_multiple(self) -> int:
    return models.size_multiple(self.settings.model)


def _restore_state_here(path: str) -> dict[str, Any]:
  """Restores a state saved on any device topology onto this process's first device."""
  checkpointer = ocp.StandardCheckpointer()
  with _without_routine_warnings():
    tree = checkpointer.metadata(path).item_metadata
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device), tree)
    return checkpointer.restore(path, target)


def _locate(path: str) -> tuple[str, int | None]:
  """(checkpoints directory, explicit step or None) for a workdir, checkpoints or step dir."""
  path = os.path.abspath(os.path.expanduser(path))
  if not os.path.exists(path):
    raise CheckpointError(f"{path}: no such checkpoint or workdir")
  if os.path.isdir(os.path.join(path, CHECKPOINT_DIR)):
    return os.path.join(path, CHECKPOINT_DIR), None
  if os.path.isdir(os.path.join(path, "state")) and os.path.basename(path).isdigit():
    return os.path.dirname(path), int(os.path.basename(path))
  if os.path.isdir(path) and any(p.isdigit() for p in os.listdir(path)):
    return path, None
  raise CheckpointError(
    f"{path} is not a checkpoint: expected a training workdir (with {CHECKPOINT_DIR}/), "
    f"its {CHECKPOINT_DIR}/ directory, or one step directory inside it"
  )


def latest_step(workdir: str) -> int | None:
  """The newest checkpoint step of a training workdir (None: it has saved none)."""
  directory = os.path.join(workdir, CHECKPOINT_DIR)
  if not os.path.isdir(directory):
    return None
  return manager(directory, read_only=True).latest_step()


def default_step(mngr: ocp.CheckpointManager, best: bool = True) -> int | None:
  """The step `load` restores when none is named: the best by validation mean IoU (with
  `best`), else the latest."""
  return (mngr.best_step() if best else None) or mngr.latest_step()


def load(
  path_or_workdir: str, step: int | None = None, *, best: bool = True, aux_heads: bool = False
) -> Restored:
  """Loads a trained model for prediction or fine-tuning.

  The deep-supervision heads of a run trained with `train.deep_supervision` are training
  state only: they are left out of the variables, which hold the inference network (the
  parameters of the same model trained without them).

  Args:
    path_or_workdir: a training workdir, its checkpoints/ directory or one step directory.
    step: a specific step; default the best by validation mIoU (or the latest when
      `best` is False or no checkpoint has validation metrics).
    best: prefer the best checkpoint over the latest.
    aux_heads: keep the deep-supervision heads in the params (fine-tuning).

  Returns:
    A `Restored` with the model, its variables and the config it was trained with.

  Raises:
    CheckpointError: the path is not a checkpoint or the step does not exist.
  """
  directory, explicit = _locate(path_or_workdir)
  step = step if step is not None else explicit
  mngr = manager(directory, read_only=True)
  steps = mngr.all_steps()
  if not steps:
    raise CheckpointError(f"{directory}: holds no finished checkpoint")
  if step is None:
    step = default_step(mngr, best)
  if step not in steps:
    raise CheckpointError(f"{directory}: no checkpoint at step {step}; available: {steps}")
  try:
    config = read_config(mngr, step)
    state = _restore_state_here(os.path.join(directory, str(step), "state"))
  except Exception as e:  # noqa: BLE001 - orbax raises many kinds for a broken directory
    raise CheckpointError(f"{directory}/{step}: cannot restore checkpoint: {e}") from e
  config = ml_collections.ConfigDict(config)
  try:
    settings = config_lib.parse(config)
  except config_lib.ConfigError as e:
    raise CheckpointError(f"{directory}/{step}: its saved config: {e}") from None
  params = state["params"]
  variables = {"params": params if aux_heads else models.without_aux_heads(params)}
  if state.get("batch_stats"):
    variables["batch_stats"] = state["batch_stats"]
  return Restored(
    model=models.build(settings.model),
    variables=variables,
    config=config,
    step=int(step),
    path=os.path.join(directory, str(step)),
    settings=settings,
  )
