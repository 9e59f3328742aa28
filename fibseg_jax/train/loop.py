"""The training loop: checks, data-parallel steps, validation, checkpoints, resume.

`train_and_evaluate(config, workdir)` is what experiments/train.py calls. Every check
of the user's config and data runs before anything is compiled. Restarting with the
same workdir resumes from the latest checkpoint and ends at the same step count; the
data stream is a pure function of (seed, step), so a resumed run sees the same batches
as one that never stopped. Ctrl-C finishes the current step, saves a checkpoint there
and raises KeyboardInterrupt with a one-line message (see `train_and_evaluate`).
"""

from __future__ import annotations

import dataclasses
import json
import os
import threading
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from fibseg_jax import checkpoint, interrupt, models, outputs
from fibseg_jax.data import loader as loader_lib
from fibseg_jax.data import volume as volume_lib
from fibseg_jax.progress import Bar
from fibseg_jax.train import config as config_lib
from fibseg_jax.train import data_config, from_prior, losses, metrics_writer, parallel
from fibseg_jax.train import distill as distill_lib
from fibseg_jax.train import state as state_lib
from fibseg_jax.train.config import ConfigError

__all__ = [
  "ConfigError",
  "Experiment",
  "check_workdir",
  "claim_workdir",
  "prepare",
  "train_and_evaluate",
]

# What `claim_workdir` marks a training workdir as (`outputs.MARKER`).
WORKDIR_KIND = "train"


@dataclasses.dataclass
class Experiment:
  """A checked config with the objects built from it.

  Attributes:
    config: the ConfigDict as the user set it, with what the volume decides filled in
      (model.num_classes, data.classes): what is printed and saved with checkpoints.
    settings: the same, typed once (`config.parse`): what the layers below take.
    volume: the volume trained on.
    loader_config: the slab loader's settings.
    distill: the resolved teacher, or None without distillation.
  """

  config: ml_collections.ConfigDict
  settings: config_lib.Settings
  volume: volume_lib.Volume
  loader_config: loader_lib.LoaderConfig
  distill: distill_lib.Distill | None = None


def prepare(config: ml_collections.ConfigDict, workdir: str | None = None) -> Experiment:
  """Checks the config against the volume and fills in what the volume decides.

  The config is parsed once here (`config.parse`, with the volume's classes); fills
  config.model.num_classes (when -1) and config.data.classes. `workdir` is the run's,
  where a teacher given as workdirs has its probabilities (`distill.settings`).

  Raises:
    ConfigError: naming the --config.* flag and the expected value. Only user mistakes
      become ConfigError; any other exception is a bug and propagates as it is.
  """
  config = ml_collections.ConfigDict(config.to_dict())
  config = from_prior.adopt_backbone(config)  # init_from=prior: the prior's widths
  path = config.data.get("path")
  if not path:
    raise ConfigError("--config.data.path is required: the volume to train on (e.g. vol.zarr)")
  try:
    volume = volume_lib.open_volume(path)
  except volume_lib.VolumeError as e:
    raise ConfigError(f"--config.data.path: {e}") from None
  if not volume.classes or not volume.metadata.annotated_slices:
    raise ConfigError(
      f"--config.data.path={path} has no labels (ingested to be segmented only); "
      "ingest it again with --labels (and --classes) to train on it"
    )
  settings = config_lib.parse(config, classes=volume.classes)
  d, t = settings.data, settings.train
  try:
    volume.channel_indices(d.channels, "--config.data.channels")
  except volume_lib.VolumeError as e:
    raise ConfigError(str(e) if "--config" in str(e) else f"--config.data.path: {e}") from None
  config.model.num_classes = settings.model.num_classes
  config.data.classes = d.classes
  try:
    multiple = models.size_multiple(settings.model)
    models.check_input_shape(settings.model, d.slices, d.patch, d.patch)
  except (models.ModelConfigError, models.InputShapeError) as e:
    raise ConfigError(f"--config.model / --config.data: {e}") from None
  parallel.check_batch_size(t.batch_size)
  semi = settings.semi
  distilled = distill_lib.settings(settings.distill, workdir)
  if semi.enabled and distilled is not None:
    raise ConfigError(
      "--config.semi.weight and --config.distill.teacher: semi-supervised training and "
      "distillation are alternatives; set one of them"
    )
  unlabelled = settings.unlabelled_batch
  if semi.enabled:
    parallel.check_batch_size(unlabelled, "--config.semi.batch_size")
  if distilled is not None:
    parallel.check_batch_size(unlabelled, "--config.distill.batch_size")
  loader_config = data_config.loader_config(
    settings,
    size_multiple=multiple,
    unlabelled=unlabelled,
    teacher=distilled.array if distilled else "",
    numbering=volume.metadata.numbering,
  )
  try:
    loader_lib.validate_config(loader_config, volume, jax.process_count())
  except (loader_lib.LoaderError, volume_lib.VolumeError) as e:
    raise ConfigError(str(e)) from None
  return Experiment(config, settings, volume, loader_config, distilled)


# Below this share of labelled pixels on the training slices, labels are brush strokes.
SPARSE_SHARE = 0.1


def sparse_labels_hint(
  loader: loader_lib.SlabLoader, volume: volume_lib.Volume, settings: config_lib.Settings
) -> str | None:
  """A one-line hint when the labels are strokes and no teacher is set, else None."""
  if settings.distill.teacher or settings.semi.enabled:
    return None
  _, height, width = volume.shape
  area = len(loader.train_slices) * height * width
  share = (loader.train_area + loader.val_area) / area if area else 1.0
  if share >= SPARSE_SHARE:
    return None
  return (
    f"note: {share:.1%} of the training slices' pixels are labelled (brush strokes?); "
    "--config.distill.teacher=forest (a random forest fitted on them teaches the network "
    "every slice) trained better from strokes where measured (docs/results.md, Annotating less)"
  )


def _volume_id(path: Any) -> str:
  """A volume root as a comparable string: the real path of a local directory."""
  local = volume_lib.local_path(str(path)) if path else None
  return os.path.realpath(local) if local else str(path)


def _model_fields(settings: config_lib.Settings) -> dict[str, Any]:
  """The name and every field of the model, defaults filled in, tuples as lists (as
  the flags and the saved JSON spell them)."""
  model = dataclasses.asdict(settings.model) if settings.model else {}
  return json.loads(json.dumps({"name": settings.model_name, **model}))


def _identity(settings: config_lib.Settings) -> dict[str, tuple[Any, Any]]:
  """flag -> (value as shown, value as compared) of what makes two runs one experiment."""
  d = settings.data
  fields = {
    "--config.data.path": (d.path, _volume_id(d.path)),
    "--config.data.channels": (",".join(d.channels), d.channels),
    "--config.data.slices": (d.slices, d.slices),
    "--config.data.patch": (d.patch, d.patch),
    "the classes of --config.data.path": (list(d.classes), d.classes),
  }
  # Semi-supervised runs hold a teacher in their state: a run is one or the other.
  weight = settings.semi.weight
  fields["--config.semi.weight"] = (weight, weight > 0)
  # Deep-supervised runs hold the heads of the lower decoder levels in their state.
  heads = settings.train.deep_supervision
  fields["--config.train.deep_supervision"] = (heads, heads)
  # A resumed student keeps its teacher (the batches it saw came from it).
  teacher = settings.distill.teacher
  fields["--config.distill.teacher"] = (",".join(teacher), teacher)
  for key, value in _model_fields(settings).items():
    fields[f"--config.model.{key}"] = (value, value)
  return fields


def is_training_workdir(path: str) -> bool:
  """Whether `path` holds an earlier training run: its marker, or (a run written before
  markers existed) its checkpoints, metrics or distillation teacher."""
  return (
    outputs.marker_kind(path) == WORKDIR_KIND
    or os.path.isdir(os.path.join(path, checkpoint.CHECKPOINT_DIR))
    or os.path.isfile(os.path.join(path, metrics_writer.METRICS_FILE))
    or os.path.isfile(os.path.join(path, distill_lib.TEACHER_DIR, distill_lib.RECORD))
  )


def claim_workdir(settings: config_lib.Settings, workdir: str) -> None:
  """Claims `workdir` as every other output is claimed (`fibseg_jax.outputs.claim`).

  A new or empty folder, or an earlier training run (resumed), is taken and marked as a
  training workdir; missing parent folders are created. Anything else (a folder of raw
  data, another command's output, a file) is refused before anything is written, as is
  a workdir that is or holds the volume, the run it fine-tunes or its teachers. Only
  process 0 claims (and writes the marker).

  Raises:
    ConfigError: one line naming --workdir.
  """
  if not workdir:
    raise ConfigError("--workdir is required: the folder for checkpoints and metrics")
  inputs: dict[str, Any] = {"--config.data.path": settings.data.path}
  if settings.train.init_from:
    inputs["--config.train.init_from"] = settings.train.init_from
  teacher = settings.distill.teacher
  if teacher and teacher != (distill_lib.FOREST,):
    inputs["--config.distill.teacher"] = list(teacher)
  local = volume_lib.local_path(str(workdir))
  if local is None or jax.process_index() != 0:
    return  # an object store's prefix; other processes leave the claim to process 0
  try:
    os.makedirs(os.path.dirname(os.path.abspath(local)), exist_ok=True)
    outputs.claim(
      local,
      kind=WORKDIR_KIND,
      flag="--workdir",
      inputs=inputs,
      is_own=is_training_workdir,
      directory=True,
    )
  except outputs.OutputError as e:
    message = str(e)
    if "is not a fibseg train output" in message:
      message = message.replace(
        "is not a fibseg train output (no fibseg metadata of that kind)",
        "is not a training run (no checkpoints/, metrics.jsonl or fibseg marker)",
      )
    raise ConfigError(message) from None
  except OSError as e:
    raise ConfigError(f"--workdir={workdir}: cannot create it: {e}") from None


def check_workdir(settings: config_lib.Settings, workdir: str) -> int | None:
  """Returns the latest checkpoint step of `workdir` (None if fresh).

  A workdir resumes only the experiment it holds: the volume (--config.data.path), its
  channels, slab depth, patch size, classes and every model field must be those saved
  with its latest checkpoint. Starting a new run from its weights is
  --config.train.init_from.

  Args:
    settings: the checked settings (`prepare(...).settings`).
    workdir: the training workdir.

  Raises:
    ConfigError: the workdir is a file, its checkpoints cannot be read, or they belong
      to a different experiment; naming each flag that differs with both values.
  """
  directory = os.path.join(workdir, checkpoint.CHECKPOINT_DIR)
  if not os.path.isdir(directory):
    if os.path.isfile(workdir):
      raise ConfigError(f"--workdir={workdir} is a file; expected a directory")
    return None
  mngr = checkpoint.manager(directory, read_only=True)
  latest = mngr.latest_step()
  if latest is None:
    return None
  try:
    saved = config_lib.parse(checkpoint.read_config(mngr, latest))
  except Exception as e:  # noqa: BLE001 - orbax raises many kinds for a broken directory
    raise ConfigError(
      f"--workdir={workdir}: cannot read the config of its checkpoint {latest}: {e}"
    ) from e
  theirs, mine = _identity(saved), _identity(settings)
  name = "--config.model.name"
  if theirs.get(name) != mine.get(name):  # another model: its name says enough
    theirs, mine = (
      {k: v for k, v in d.items() if k == name or not k.startswith("--config.model.")}
      for d in (theirs, mine)
    )
  absent = (None, None)
  differ = [
    f"{flag}={theirs.get(flag, absent)[0]} there, {mine.get(flag, absent)[0]} now"
    for flag in dict.fromkeys([*theirs, *mine])
    if theirs.get(flag, absent)[1] != mine.get(flag, absent)[1]
  ]
  if differ:
    raise ConfigError(
      f"--workdir={workdir} holds checkpoints (step {latest}) of a different experiment: "
      + "; ".join(differ)
      + ". Resume with the saved values, use a new --workdir, or start a new run from its "
      f"weights with --config.train.init_from={workdir}"
    )
  return latest


def _init_from(
  state, settings: config_lib.Settings, tx, source: str, replicated
) -> tuple[state_lib.TrainState, checkpoint.Restored]:
  """Replaces freshly initialised weights by those of another run (fine-tuning).

  Returns:
    (the state with the source's weights and a fresh optimizer, the source checkpoint).
  """
  if from_prior.prior_directory(source):  # the shipped prior or a `fibseg pretrain` export
    return from_prior.init_state(state, settings, tx, source, replicated)
  try:
    restored = checkpoint.load(source, aux_heads=True)
  except checkpoint.CheckpointError as e:
    raise ConfigError(f"--config.train.init_from: {e}") from None
  theirs, mine = _model_fields(restored.settings), _model_fields(settings)
  if theirs != mine:
    diff = sorted(k for k in set(theirs) | set(mine) if theirs.get(k) != mine.get(k))
    raise ConfigError(
      f"--config.train.init_from={source}: its model differs in {diff} "
      f"({[theirs.get(k) for k in diff]} there, {[mine.get(k) for k in diff]} here)"
    )
  # Deep-supervision heads are taken from the source where both runs have them, start
  # fresh where only this run has them, and are dropped where only the source has them.
  params = {
    k: v
    for k, v in restored.variables["params"].items()
    if not models.is_aux_head(k) or k in state.params
  }
  params = jax.device_put(params, replicated)
  params.update({k: v for k, v in state.params.items() if k not in params})
  batch_stats = jax.device_put(restored.variables.get("batch_stats", {}), replicated)
  shapes = lambda tree: jax.tree.map(lambda a: tuple(a.shape), tree)  # noqa: E731
  if shapes(params) != shapes(state.params):
    raise ConfigError(f"--config.train.init_from={source}: parameters do not fit this model")
  # Copies: the step donates the state's buffers, and one buffer cannot be donated twice.
  weights = {"params": params, "batch_stats": batch_stats}
  teacher = jax.tree.map(jnp.copy, weights) if state.teacher else {}
  state = state.replace(
    params=params, batch_stats=batch_stats, opt_state=tx.init(params), teacher=teacher
  )
  return state, restored


def fine_tune_line(train: config_lib.TrainSettings, source: str, step: int | None) -> str:
  """What a fine-tune starts from and how its learning rate runs, as one line."""
  t = train
  peak = state_lib.peak_learning_rate(train)
  warmup = min(t.warmup_steps, max(t.steps - 1, 0))
  at = f" (step {step})" if step is not None else ""
  plural = "s" if warmup != 1 else ""
  rise = f"warming up over {warmup} step{plural} to" if warmup else "starting at"
  return (
    f"fine-tuning: starting from the weights of {source}{at} with a fresh optimizer; "
    f"learning rate {rise} a peak of {peak:.3g} (--config.train.learning_rate="
    f"{t.learning_rate:g} x --config.train.init_lr_scale={t.init_lr_scale:g})"
  )


def _start_words(start: int, init_from: str) -> str:
  """How the run starts, for the line under the parameter count."""
  if start:
    tuned = f" (a fine-tune of {init_from})" if init_from else ""
    return f"resuming from step {start}{tuned}"
  return f"fine-tuning the weights of {init_from}" if init_from else "starting from scratch"


def _validate(eval_step, state, loader, batch_sharding, classes) -> dict[str, float]:
  k = len(classes)
  cm = np.zeros((k, k), np.int64)
  loss_sum, count = 0.0, 0
  for local in loader.validation_batches():
    batch = parallel.global_batch(_as_model_batch(local), batch_sharding)
    c, loss, n = jax.device_get(eval_step(state, batch))
    cm += np.asarray(c, np.int64)
    loss_sum += float(loss)
    count += int(n)
  iou, miou = losses.iou_from_confusion(cm)
  iou = np.asarray(iou)
  metrics = {
    "val_loss": loss_sum / max(count, 1),
    "val_miou": float(miou),
    "val_accuracy": float(np.trace(cm) / max(cm.sum(), 1)),
  }
  metrics.update({f"val_iou/{name}": float(iou[i]) for i, name in enumerate(classes)})
  return metrics


def _as_model_batch(local: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  return {**local, "labels": local["labels"].astype(np.int32)}


def train_and_evaluate(
  config: ml_collections.ConfigDict,
  workdir: str,
  *,
  progress: bool = True,
  stop: threading.Event | None = None,
) -> dict[str, Any]:
  """Trains (or resumes) the experiment in `workdir`.

  Args:
    config: experiment config (see fibseg_jax.train.config.base_config).
    workdir: where checkpoints, metrics.jsonl, TensorBoard events and curves go.
    progress: show a progress bar on process 0.
    stop: setting it from another thread (a GUI's Cancel) stops as a Ctrl-C does: after
      the step in flight, with its checkpoint saved, raising KeyboardInterrupt.

  Returns:
    Summary: final step, best step and its validation metrics, last train loss.

  Raises:
    ConfigError: a user mistake in the config, the volume or the workdir, found before
      anything is compiled. Any other exception is a bug.
    KeyboardInterrupt: Ctrl-C, with a one-line message. The step in flight is finished
      and saved (``stopped at step N: checkpoint saved in WORKDIR; rerun the same command
      to resume``), so a rerun continues exactly as if nothing had stopped it; a second
      Ctrl-C during the step stops at once without that checkpoint, one during the save
      only waits for it. A multi-process run cannot save on Ctrl-C (its processes get
      the signal at different steps): its message names the validation step a rerun
      resumes from.
  """
  try:
    return _train_and_evaluate(config, workdir, progress, stop)
  except KeyboardInterrupt as e:
    if e.args:  # worded by the loop
      raise
    raise KeyboardInterrupt(
      "stopped before training began: nothing new to save; rerun the same command to resume"
    ) from None


def _train_and_evaluate(
  config: ml_collections.ConfigDict,
  workdir: str,
  progress: bool,
  stop_event: threading.Event | None,
) -> dict[str, Any]:
  exp = prepare(config, workdir)
  config, settings, distilled = exp.config, exp.settings, exp.distill  # config: to save
  claim_workdir(settings, workdir)
  start = check_workdir(settings, workdir) or 0
  t = settings.train
  is_main = jax.process_index() == 0
  if (
    distilled is not None
    and distilled.computed
    and not distill_lib.is_probabilities_array(distilled.array)
  ):
    raise ConfigError(
      f"--config.distill.teacher={','.join(settings.distill.teacher)}: its probabilities "
      f"{distilled.array} are not computed yet; `fibseg train` computes them first (from "
      "Python: fibseg_jax.infer.distill.prepare_teacher(config, workdir))"
    )
  try:
    loader = loader_lib.SlabLoader(exp.volume, exp.loader_config)
  except (loader_lib.LoaderError, volume_lib.VolumeError) as e:  # e.g. no labels to split
    raise ConfigError(str(e)) from None
  weights = None
  if t.class_weights:
    weights = losses.class_weights(loader.class_counts())
  classes = settings.data.classes

  mesh = parallel.make_mesh()
  replicated, batch_sharding = parallel.shardings(mesh)
  model = models.build(settings.model)
  tx, schedule = state_lib.make_optimizer(t)
  lc = exp.loader_config
  sample = jnp.zeros((1, lc.slices, lc.patch, lc.patch, len(lc.channels)), jnp.float32)
  rng = jax.random.PRNGKey(t.seed)
  semi = settings.semi
  deep_supervision = t.deep_supervision
  init = lambda r: state_lib.create_state(  # noqa: E731
    model, tx, r, sample, teacher=semi.enabled, deep_supervision=deep_supervision
  )
  abstract = jax.eval_shape(init, rng)
  state_sharding = jax.tree.map(lambda _: replicated, abstract)

  mngr = checkpoint.manager(os.path.join(workdir, checkpoint.CHECKPOINT_DIR), keep=t.keep)
  if start:
    target = jax.tree.map(
      lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=replicated), abstract
    )
    state, _, loader_state = checkpoint.restore(mngr, start, target)
    start = int(loader_state.get("step", start))
  else:
    # The partitionable threefry unrolls per parameter and makes init compile 2-10x
    # slower on CPU; init is replicated, so the non-partitionable stream loses nothing.
    with jax.threefry_partitionable(False):
      state = jax.jit(init, out_shardings=state_sharding)(rng)
    if t.init_from:
      state, source = _init_from(state, settings, tx, t.init_from, replicated)
      if is_main:
        print(fine_tune_line(t, source.path, source.step))
  if is_main:
    n_params = models.count_params(models.without_aux_heads(state.params))
    n_heads = models.count_params(state.params) - n_params
    heads = f" (+{n_heads:,} in deep-supervision heads)" if n_heads else ""
    print(
      f"{settings.model_name}: {n_params:,} parameters{heads}; {jax.device_count()} device(s) "
      f"on {jax.process_count()} process(es); " + _start_words(start, t.init_from)
    )
    hint = sparse_labels_hint(loader, exp.volume, settings)
    if hint:
      print(hint)
    numbering = exp.volume.metadata.numbering
    held_out = numbering.labels(loader.config.eval_slices) or "none"
    print(
      f"annotated slices (the numbers of their files): training on "
      f"{numbering.labels(loader.train_slices)}, held out for evaluation {held_out}"
    )

  train_step, eval_step = state_lib.jit_steps(
    state_lib.make_train_step(
      model,
      tx,
      schedule,
      weights,
      t.dice_weight,
      semi,
      deep_supervision,
      distill_weight=distilled.weight if distilled else 0.0,
    ),
    state_lib.make_eval_step(model, len(classes), weights, t.dice_weight),
    state_sharding,
    batch_sharding,
  )
  writer = metrics_writer.MetricWriter(workdir, enabled=is_main, resume_step=start)
  steps = t.steps
  best = {"step": mngr.best_step(), "val_miou": None}
  if t.init_from and not start and mngr.latest_step() is None:
    # The weights it starts from, scored and kept as checkpoint 0: the best checkpoint
    # (what segment loads) is never worse on validation than where the fine-tune began.
    val = _validate(eval_step, state, loader, batch_sharding, classes)
    writer.write(0, val)
    checkpoint.save(mngr, 0, state, config, {"step": 0, "seed": t.seed}, val)
    best = {"step": 0, **val}
    if is_main:
      print(
        f"step 0 (the weights it starts from): validation mean IoU {val['val_miou']:.3f}, "
        "kept as checkpoint 0, so the best checkpoint is never worse"
      )
  last_loss = None
  batches = loader.batches(start_step=start)
  bar = Bar(
    total=steps, initial=start, desc="train", unit="step", disable=not (progress and is_main)
  )
  tick, tick_step = time.perf_counter(), start
  # Saving on Ctrl-C needs every process to stop at the same step, and processes get
  # their signals at different steps; several processes keep their validation-step
  # checkpoints only (a rerun resumes from the last of them).
  processes = jax.process_count()
  stop = interrupt.StopRequest(
    first="stopping after this step to save a checkpoint (Ctrl-C again: stop now, without it)",
    protected="writing the checkpoint; stopping once it is complete",
    enabled=processes == 1,
    event=stop_event,
  )
  saved = start  # the step of the latest checkpoint (0: none)
  current = start  # the step in flight, counted from 1
  stopped = False

  def save(step: int, val: dict[str, float] | None) -> None:
    nonlocal saved
    with stop.protected():
      checkpoint.save(mngr, step, state, config, {"step": step, "seed": t.seed}, val)
    saved = step

  with stop:
    try:
      for step in range(start, steps):
        current = step + 1
        batch = parallel.global_batch(_as_model_batch(next(batches)), batch_sharding)
        state, metrics = train_step(state, batch)
        # Wait for the step so the progress bar tells the truth; the loader's prefetch
        # thread keeps reading meanwhile, so little is lost.
        metrics["loss"].block_until_ready()
        done = step + 1
        if done % t.log_every == 0 or done == steps:
          metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
          now = time.perf_counter()
          metrics["patches_per_s"] = (done - tick_step) * lc.batch_size / max(now - tick, 1e-9)
          tick, tick_step = now, done
          last_loss = metrics["loss"]
          writer.write(done, metrics)
          bar.set_postfix(loss=f"{last_loss:.4f}", patches_s=f"{metrics['patches_per_s']:.1f}")
        if done % t.eval_every == 0 or done == steps:
          val = _validate(eval_step, state, loader, batch_sharding, classes)
          writer.write(done, val)
          save(done, val)
          if best["val_miou"] is None or val["val_miou"] > best["val_miou"]:
            best = {"step": done, **val}
          bar.set_postfix(
            loss=f"{last_loss:.4f}" if last_loss is not None else "-",
            val_miou=f"{val['val_miou']:.3f}",
          )
        bar.update(1)
        if stop.requested and done < steps:
          if saved != done:
            save(done, None)  # no validation: it would delay the stop
          stopped = True
          break
    except KeyboardInterrupt as e:
      if e.args:
        raise
      resume = f"step {saved}" if saved else "the start"
      why = (
        f"a run of {processes} processes saves only at its validation steps (every "
        f"--config.train.eval_every={t.eval_every})"
        if processes > 1
        else "without saving it"
      )
      raise KeyboardInterrupt(
        f"stopped during step {current}, {why}; rerun the same command to resume from {resume}"
      ) from None
    finally:
      bar.close()
      loader.close()
      writer.close()
    with stop.protected():  # the curves (so far); a Ctrl-C now only repeats the request
      curves = metrics_writer.plot_curves(workdir, settings=settings) if is_main else None
  if stopped:
    raise KeyboardInterrupt(
      f"stopped at step {saved}: checkpoint saved in {workdir}; rerun the same command to resume"
    )
  best_step = mngr.best_step()
  if best_step is not None and best_step != best.get("step"):
    best = {"step": best_step}  # found by an earlier run of this workdir
  summary = {"step": steps, "best": best, "last_loss": last_loss, "curves": curves}
  if is_main:
    print(f"done: step {steps}; best step {best['step']}; curves {curves}")
  return summary
