"""One run of the study: train, segment and score a network, or fit and apply a route.

Every run is scored the same way (`score`): the summed confusion matrix over the
evaluation slices, through `fibseg_jax.eval.metrics`, which is what evaluate.py reports
for a network. A run's result is a JSON-ready dict written to `result.json` in its
directory; a directory with one is finished and is never recomputed.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import ml_collections
import numpy as np

from fibseg_jax import baselines, checkpoint, configs, infer, models, outputs
from fibseg_jax.data import volume as volume_lib
from fibseg_jax.eval import metrics
from fibseg_jax.infer import distill as infer_distill
from fibseg_jax.study import budget as budget_lib
from fibseg_jax.study.context import OneStack
from fibseg_jax.train import loop

RESULT = "result.json"


class Cell(NamedTuple):
  """One seed of a row fitted on a volume's training pixels and scored on its evaluation
  slices: a classical route (`run_route`) or a peer network (`peers.run_peer`).

  Attributes:
    vol: the (raw) volume.
    channels: channels the row reads.
    seed: the row's seed.
    eval_slices: slices segmented and scored.
    held_out: annotated slices kept out of training.
  """

  vol: volume_lib.Volume
  channels: Sequence[str]
  seed: int
  eval_slices: Sequence[int]
  held_out: Sequence[int]


def cache_compilations(out: str) -> None:
  """Caches compiled XLA programs under `out`/.jax_cache, unless a cache is already set.

  The seeds of a row, channel sets of equal size and resumed runs compile the same steps;
  `JAX_COMPILATION_CACHE_DIR` (or an earlier `jax.config` setting) wins.
  """
  if not jax.config.jax_compilation_cache_dir:
    jax.config.update("jax_compilation_cache_dir", os.path.join(out, ".jax_cache"))


def read_result(directory: str) -> dict[str, Any] | None:
  """The finished result of a run directory, or None."""
  path = os.path.join(directory, RESULT)
  if not os.path.exists(path):
    return None
  with open(path) as f:
    return json.load(f)


def write_result(directory: str, result: dict[str, Any]) -> dict[str, Any]:
  """Writes the finished `result` of a run directory (`read_result`) and returns it."""
  write_json(os.path.join(directory, RESULT), result)
  return result


def write_document(
  out: str, name: str, document: Mapping[str, Any], markdown: Callable[..., str]
) -> str:
  """Writes a study's table as `out`/`name`.json and its `markdown` as `name`.md.

  Returns:
    The markdown text.
  """
  write_json(os.path.join(out, f"{name}.json"), document)
  text = markdown(document)
  with open(os.path.join(out, f"{name}.md"), "w") as f:
    f.write(text)
  return text


def claim_study_directory(
  out: str, volume: str | None, *, kind: str, legacy: Sequence[str] = ()
) -> None:
  """Claims `out` for a study of `kind` (`fibseg_jax.outputs`): new, empty or its own.

  A volume generated inside `out` (the synthetic stack) is the study's own; any other
  `volume` must lie outside it.

  Raises:
    ValueError: `out` holds other files, or is or holds `volume`.
  """
  generated = volume and os.path.dirname(os.path.realpath(volume)) == os.path.realpath(out)
  try:
    outputs.claim(
      out,
      kind=kind,
      flag="--out",
      inputs={"--volume": volume} if volume and not generated else {},
      directory=True,
      legacy=tuple(legacy),
    )
  except outputs.OutputError as e:
    raise ValueError(str(e)) from e


def settings(budget: budget_lib.Budget, **fields: Any) -> dict[str, Any]:
  """What a cached result was computed with, as JSON (compared on every reuse)."""
  return json.loads(json.dumps({"budget": budget.to_json(), **fields}))


def cell_settings(
  budget: budget_lib.Budget, stack: OneStack, seed: int, **fields: Any
) -> dict[str, Any]:
  """`settings` of one seed's network trained on `stack`, with the study's `fields`."""
  return settings(
    budget,
    volume=stack.volume,
    channels=list(stack.channels),
    slices=stack.slices,
    seed=seed,
    train_slices=list(stack.train_slices),
    eval_slices=list(stack.eval_slices),
    **fields,
  )


def cached(directory: str, settings: Mapping[str, Any]) -> dict[str, Any] | None:
  """The finished result of `directory` if it was computed with `settings`.

  Raises:
    ValueError: it holds a result of other settings (naming them); the output directory
      belongs to another experiment.
  """
  done = read_result(directory)
  if done is None:
    return None
  theirs = done.get("settings", {})
  differ = sorted(k for k in {*theirs, *settings} if theirs.get(k) != settings.get(k))
  if differ:
    raise ValueError(
      f"{directory} holds a result computed with other {', '.join(differ)}; "
      "use another --out for other settings"
    )
  return done


def write_json(path: str, value: Any) -> None:
  """Writes JSON through a temporary file, so a crash never leaves half a file."""
  os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
  outputs.write_text(path, json.dumps(value, indent=1, allow_nan=False))


def _num(value: float) -> float | None:
  value = float(value)
  return None if not np.isfinite(value) else value


def score(
  truths: Mapping[int, np.ndarray], predictions: Mapping[int, np.ndarray], classes: Sequence[str]
) -> dict[str, Any]:
  """Scores predictions of the evaluation slices with the networks' metrics.

  Args:
    truths: {z: labels [y, x] uint8}, 255 = not annotated.
    predictions: {z: labels [y, x] uint8} for the same slices.
    classes: class names.

  Returns:
    mean_iou, accuracy, per_class_iou {class: IoU}, truth_fraction and
    predicted_fraction {class: fraction of the annotated voxels}, fraction_error
    {class: predicted - truth} and the confusion matrix; NaN becomes None.
  """
  k = len(classes)
  confusion = sum(metrics.confusion_matrix(truths[z], predictions[z], k) for z in sorted(truths))
  m = metrics.metrics_from_confusion(confusion)
  per_class = lambda values: {c: _num(v) for c, v in zip(classes, values, strict=True)}  # noqa: E731
  return {
    "mean_iou": _num(m.mean_iou),
    "accuracy": _num(m.accuracy),
    "per_class_iou": per_class(m.iou),
    "truth_fraction": per_class(m.truth_fractions),
    "predicted_fraction": per_class(m.predicted_fractions),
    "fraction_error": per_class(m.predicted_fractions - m.truth_fractions),
    "confusion_matrix": m.confusion.tolist(),
  }


def network_config(
  budget: budget_lib.Budget,
  *,
  architecture: str,
  channels: Sequence[str],
  slices: int,
  seed: int,
  volume: str,
  held_out: Sequence[int],
) -> ml_collections.ConfigDict:
  """The experiment config of one network run: the shipped config of `architecture`
  (fibseg_jax/configs/*.py) and the budget's settings, as `fibseg train` flags would set.

  Args:
    budget: steps, widths, patch and batch.
    architecture: "unet" or "sensor3d".
    channels: input channels.
    slices: slab depth.
    seed: training seed (the validation split keeps its own seed, 0).
    volume: volume path.
    held_out: annotated slices never trained on (evaluation slices and any annotated
      slice that is not a training slice).
  """
  # What `fibseg train --config=<architecture>` trains, at the budget's widths.
  config = configs.load(configs.path(architecture))
  config.model.update(budget.model(architecture))
  # The list fields as tuples; their base defaults are command-line strings ("ICE,TLD"),
  # so the section is rebuilt rather than assigned field by field (ConfigDict keeps types).
  config.data = ml_collections.ConfigDict(
    {
      **config.data.to_dict(),
      "channels": tuple(channels),
      "eval_slices": tuple(sorted(int(z) for z in held_out)),
    }
  )
  d, t = config.data, config.train
  d.path = volume
  d.slices = int(slices)
  d.patch = budget.patch
  d.val_block = budget.val_block
  d.workers = budget.workers
  t.seed = int(seed)
  t.steps = budget.steps
  t.batch_size = budget.batch_size
  t.eval_every = budget.eval_every
  t.warmup_steps = budget.warmup_steps
  t.log_every = max(1, min(20, budget.steps))
  set_fields(config, dict(budget.overrides))
  return config


def set_fields(config: ml_collections.ConfigDict, values: Mapping[str, Any]) -> None:
  """Sets each dotted field of `values` in `config` (e.g. {"train.learning_rate": 3e-3}).

  A comma string given for a tuple field becomes a tuple of the field's item type.

  Raises:
    KeyError: a field `config` lacks.
  """
  for dotted, value in values.items():
    *sections, field = dotted.split(".")
    section = config
    for name in sections:
      section = section[name]
    if field not in section:
      raise KeyError(f"config has no field {dotted} (train.config.FIELDS)")
    current = section[field]
    if isinstance(current, tuple) and isinstance(value, str):
      kind = type(current[0]) if current else str
      value = tuple(kind(v) for v in value.split(",") if v.strip())
    section[field] = value


def read_truths(vol: volume_lib.Volume, slices: Sequence[int]) -> dict[int, np.ndarray]:
  return {int(z): vol.read_labels(int(z)) for z in slices}


def train_logged(config: ml_collections.ConfigDict, directory: str) -> tuple[str, float]:
  """Trains (or resumes) `config` in `directory`/run, quietly.

  The training output is appended to `directory`/train.log, even when training fails.

  Returns:
    (workdir, wall seconds).
  """
  workdir = os.path.join(directory, "run")
  os.makedirs(directory, exist_ok=True)
  log = io.StringIO()
  start = time.perf_counter()
  try:
    with contextlib.redirect_stdout(log):
      infer_distill.prepare_teacher(config, workdir, progress=False)  # a forest teacher
      loop.train_and_evaluate(config, workdir, progress=False)
  finally:
    with open(os.path.join(directory, "train.log"), "a") as f:
      f.write(log.getvalue())
  return workdir, time.perf_counter() - start


def train_unet(
  directory: str,
  budget: budget_lib.Budget,
  stack: OneStack,
  seed: int,
  configure: Callable[[ml_collections.ConfigDict], None] | None = None,
) -> tuple[str, float]:
  """Trains (or resumes) the budget's U-Net on the training slices of `stack`.

  Every other annotated slice is held out. `configure` may change the config first
  (e.g. the semi-supervised or recipe fields).

  Returns:
    (workdir, wall seconds), as `train_logged`.
  """
  vol = volume_lib.open_volume(stack.volume)
  config = network_config(
    budget,
    architecture="unet",
    channels=stack.channels,
    slices=stack.slices,
    seed=seed,
    volume=stack.volume,
    held_out=sorted(set(vol.metadata.annotated_slices) - set(stack.train_slices)),
  )
  if configure is not None:
    configure(config)
  return train_logged(config, directory)


def segment_settings(budget: budget_lib.Budget, **fields: Any) -> infer.SegmentSettings:
  """The budget's tiling as `infer.SegmentSettings`, quiet, with `fields` set too."""
  return infer.SegmentSettings(
    tile=budget.tile, overlap=budget.overlap, batch=budget.infer_batch, progress=False, **fields
  )


def segment_and_score(
  model: str | Sequence[str],
  volume: str | volume_lib.Volume,
  output: str,
  budget: budget_lib.Budget,
  truth_volume: volume_lib.Volume,
  eval_slices: Sequence[int],
  *,
  tta: bool = False,
  only_slices: Sequence[int] | None = None,
  probabilities: str | None = None,
) -> tuple[dict[str, Any], infer.SegmentationResult]:
  """Segments `volume` with the budget's tiling and scores the evaluation slices.

  Args:
    model: a training workdir or checkpoint, or several (an ensemble).
    volume: what is segmented.
    output: the labels array (replaced if it exists).
    budget: the tiling.
    truth_volume: whose labels are the truth.
    eval_slices: slices scored.
    tta: average over flips, quarter turns and slab reversal (`SegmentSettings.tta`).
    only_slices: segment only these slices, or None for all (`SegmentSettings`).
    probabilities: also write the class probabilities there (`segment_volume`).

  Returns:
    (`score`'s dict, the segmentation result).
  """
  segmented = infer.segment_from_checkpoint(
    model,
    volume,
    output=output,
    probabilities=probabilities,
    settings=segment_settings(budget, tta=tta, only_slices=only_slices, overwrite=True),
  )
  labels = infer.open_array(output)
  predictions = {int(z): labels[int(z)].read().result() for z in eval_slices}
  scored = score(read_truths(truth_volume, eval_slices), predictions, truth_volume.classes)
  return scored, segmented


def train_and_score(
  directory: str,
  budget: budget_lib.Budget,
  settings: dict[str, Any],
  stack: OneStack,
  seed: int,
  *,
  truth_volume: volume_lib.Volume | None = None,
  whole_stack: bool = False,
  configure: Callable[[ml_collections.ConfigDict], None] | None = None,
) -> dict[str, Any]:
  """Trains the budget's U-Net on the training slices of `stack` and scores its
  evaluation slices, once.

  A directory whose result.json holds `settings` is returned as it is. The segmentation
  (`directory/seg.zarr`) covers only the evaluation slices, or with `whole_stack` every
  slice, with the class probabilities in `directory/probs.zarr`. `configure` may change
  the config first (`train_unet`); `truth_volume` holds the truth (default the stack's).

  Returns:
    {"settings", "seed", "train_seconds", "segment_seconds", **`score`}, also written to
    `directory/result.json`.
  """
  done = cached(directory, settings)
  if done is not None:
    return done
  workdir, seconds = train_unet(directory, budget, stack, seed, configure)
  scored, segmented = segment_and_score(
    workdir,
    stack.volume,
    os.path.join(directory, "seg.zarr"),
    budget,
    truth_volume or volume_lib.open_volume(stack.volume),
    stack.eval_slices,
    only_slices=None if whole_stack else stack.eval_slices,
    probabilities=os.path.join(directory, "probs.zarr") if whole_stack else None,
  )
  return write_result(
    directory,
    {
      "settings": settings,
      "seed": int(seed),
      "train_seconds": seconds,
      "segment_seconds": segmented.seconds,
      **scored,
    },
  )


def run_network(
  directory: str,
  budget: budget_lib.Budget,
  *,
  truth_volume: volume_lib.Volume,
  eval_slices: Sequence[int],
  configure: Callable[[ml_collections.ConfigDict], None] | None = None,
  **network: Any,
) -> dict[str, Any]:
  """Trains a network, segments the whole stack with it and scores the evaluation slices.

  Training and segmentation resume if interrupted (rerun with the same directory).
  The training log goes to `directory/train.log`.

  Args:
    directory: the run's directory (workdir `run/`, segmentation `seg.zarr`).
    budget: the budget.
    truth_volume: volume whose labels are the truth (the raw one).
    eval_slices: slices scored.
    configure: changes the config before training (e.g. parts of the recipe).
    **network: the network, as `network_config`'s keywords: architecture, channels,
      slices, seed, volume (trained on and segmented: raw or cleaned) and held_out
      (annotated slices kept out of training).

  Returns:
    The result dict (also written to `directory/result.json`).
  """
  config = network_config(budget, **network)
  if configure is not None:
    configure(config)
  workdir, train_seconds = train_logged(config, directory)
  restored = checkpoint.load(workdir)
  seg = os.path.join(directory, "seg.zarr")
  scored, segmented = segment_and_score(
    workdir, network["volume"], seg, budget, truth_volume, eval_slices
  )
  return write_result(
    directory,
    {
      "seed": int(network["seed"]),
      "params": models.count_params(restored.variables),
      "train_seconds": train_seconds,
      "best_step": int(restored.step),
      "segment_seconds": segmented.seconds,
      "segment_mpixels": segmented.mpixels,
      **scored,
    },
  )


def run_route(
  directory: str,
  budget: budget_lib.Budget,
  route: str,
  cell: Cell,
  *,
  truth_volume: volume_lib.Volume | None = None,
) -> dict[str, Any]:
  """Fits a classical route on the training pixels and scores the evaluation slices.

  Args:
    directory: the run's directory.
    budget: the forest and cleaning settings.
    route: "otsu", "clean_otsu" or "forest".
    cell: the volume, channels, seed (the forest's), scored and held-out slices.
    truth_volume: whose labels are the truth; default the cell's volume.

  Returns:
    The result dict (also written to `directory/result.json`).
  """
  vol, channels, seed, eval_slices, held_out = cell
  images, labels = baselines.training_slices(
    vol, channels, eval_slices=held_out, val_block=budget.val_block
  )
  model = baselines.make_route(
    route, len(vol.classes), seed=seed, cleaning=budget.cleaning, forest=budget.forest
  )
  model.fit(list(images.values()), list(labels.values()))
  index = vol.channel_indices(channels)
  predictions = {int(z): model.predict(vol.read_image(int(z))[..., index]) for z in eval_slices}
  _, height, width = vol.shape
  return write_result(
    directory,
    {
      "seed": int(seed),
      "params": model.num_parameters,
      "train_seconds": model.seconds["clean"] + model.seconds["fit"],
      "segment_seconds": model.seconds["clean_predict"] + model.seconds["predict"],
      "segment_mpixels": len(eval_slices) * height * width / 1e6,
      "seconds": dict(model.seconds),
      **score(read_truths(truth_volume or vol, eval_slices), predictions, vol.classes),
    },
  )
