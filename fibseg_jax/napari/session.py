"""What the napari widget does, without Qt: the library's own functions, one call each.

  session = Session("vol.zarr")
  session.save_painted(painted)              # napari Labels data: 0 = not painted
  run = session.train(TrainChoice(steps=400))  # resumes a stopped run; fine-tunes a finished one
  labels, uncertainty = session.preview(z=9)
  labels, uncertainty = session.preview_from_strokes(z=9)  # saved paint -> forest -> prior
  result = session.segment()                 # out of core, resumable
  session.next_slices()                      # the ranking's suggestions
  table = session.quantify()                 # per-phase fractions, connectivity, S_V, sizes

Every method may take minutes; the widget runs them in worker threads and passes a
`threading.Event` as `stop` (Cancel). User mistakes raise `SessionError` (or the
library's own one-line errors: ConfigError, VolumeError, InferenceError), worded as on
the command line.

Run folders: `Session.runs` (default `<volume>.runs/` beside the volume) holds `run_1`,
`run_2`, ...: Train resumes the newest run while it is unfinished (a Cancel, a crash)
and otherwise starts the next one from its weights (`--config.train.init_from`), so
labels painted after a run refine it instead of starting over.

The prior `preview_from_strokes` uses: `Session.prior_dir`, by default the folder the
environment variable FIBSEG_PRIOR names (e.g. the `export` folder of your own `fibseg
pretrain`) or else the one shipped in the package (`enhance.PRIOR_DIR`).
"""

from __future__ import annotations

import ast
import dataclasses
import glob
import json
import os
import re
import threading
from collections.abc import Sequence
from typing import Any

import ml_collections
import numpy as np

from fibseg_jax import checkpoint, configs
from fibseg_jax.data import annotations
from fibseg_jax.data import ingest as ingest_lib
from fibseg_jax.data import volume as volume_lib
from fibseg_jax.eval import quantify as quantify_lib
from fibseg_jax.eval import uncertainty as uncertainty_lib
from fibseg_jax.infer import blend, enhance, store, tiling
from fibseg_jax.infer import distill as infer_distill
from fibseg_jax.infer import segment as segment_lib
from fibseg_jax.infer import slice as slice_lib
from fibseg_jax.infer.settings import SegmentationResult, SegmentSettings
from fibseg_jax.train import distill as distill_lib
from fibseg_jax.train import loop, metrics_writer
from fibseg_jax.train.config import ConfigError

RUN_PREFIX = "run_"
SEGMENTATION = "segmentation.zarr"
UNCERTAINTY = "uncertainty.zarr"
PRIOR_ENV = "FIBSEG_PRIOR"  # a prior folder to use instead of the shipped one


class SessionError(ValueError):
  """A user mistake in the widget's choices; the message names the field."""


@dataclasses.dataclass(frozen=True)
class TrainChoice:
  """The widget's training fields.

  Attributes:
    model: a shipped config name (`fibseg train --config=...`): "unet" or "sensor3d".
    channels: the volume channels the model takes; empty = all of them.
    slices: slab depth (odd).
    steps: training steps.
    overrides: further `--config.` fields, e.g. "train.batch_size=4 model.features=(8,16,32)".
    forest_teacher: also learn a random forest's probabilities over the stack, the forest
      fitted on the painted pixels (`--config.distill.teacher=forest`): for brush strokes.
  """

  model: str = "unet"
  channels: tuple[str, ...] = ()
  slices: int = 3
  steps: int = 400
  overrides: str = ""
  forest_teacher: bool = False


def parse_overrides(text: str) -> dict[str, Any]:
  """'train.batch_size=4 model.features=(8,16)' -> {'train.batch_size': 4, ...}.

  Values are Python literals where they parse (numbers, tuples, True/False), else strings.
  """
  result = {}
  for item in text.split():
    name, sep, value = item.partition("=")
    name = name.removeprefix("--").removeprefix("config.")
    if not sep or not re.fullmatch(r"[a-z_]+\.[a-z_0-9]+", name):
      raise SessionError(
        f"More settings: {item!r} is not FIELD=VALUE, e.g. train.batch_size=4 "
        "(`fibseg train --config=unet --show_config` lists the fields)"
      )
    try:
      result[name] = ast.literal_eval(value)
    except (ValueError, SyntaxError):
      result[name] = value
  return result


class Session:
  """One volume and its run folders.

  Args:
    volume: the volume root (`fibseg ingest` or `fibseg make-synthetic` wrote it).
    runs: the folder of run folders; default `<volume>.runs` beside the volume.
    prior_dir: the prior folder (prior.msgpack, prior.json) of `preview_from_strokes`;
      default $FIBSEG_PRIOR, else the shipped one.
  """

  def __init__(
    self,
    volume: str | os.PathLike,
    runs: str | os.PathLike | None = None,
    prior_dir: str | os.PathLike | None = None,
  ):
    self.root = os.fspath(volume)
    self.volume = volume_lib.open_volume(self.root, check_labels=False)
    stem = self.root.rstrip("/")
    self.runs = os.fspath(runs) if runs else f"{stem.removesuffix('.zarr')}.runs"
    self.prior_dir = os.fspath(prior_dir or os.environ.get(PRIOR_ENV) or enhance.PRIOR_DIR)
    self._prior: tuple[str, enhance.Prior] | None = None  # (its folder, the loaded prior)

  # --- labels -------------------------------------------------------------------------

  def painted(self) -> np.ndarray:
    """The volume's labels as a napari Labels layer holds them (0 = not painted)."""
    return annotations.painted_from_volume(self.volume)

  def save_painted(self, painted: np.ndarray) -> list[int]:
    """Writes the painted slices into the volume (`volume.write_labels`, crash-safe).

    Returns:
      The slices whose labels changed.
    """
    changed = annotations.save_painted(self.root, painted)
    self.volume = volume_lib.open_volume(self.root, check_labels=False)
    return changed

  # --- training -----------------------------------------------------------------------

  def run_dirs(self) -> list[str]:
    """The run folders, oldest first."""
    if not os.path.isdir(self.runs):
      return []
    numbered = [
      (int(n[len(RUN_PREFIX) :]), n)
      for n in os.listdir(self.runs)
      if n.startswith(RUN_PREFIX) and n[len(RUN_PREFIX) :].isdigit()
    ]
    return [os.path.join(self.runs, n) for _, n in sorted(numbered)]

  def latest_run(self) -> str | None:
    """The newest run folder holding a checkpoint, or None."""
    for workdir in reversed(self.run_dirs()):
      if checkpoint.latest_step(workdir) is not None:
        return workdir
    return None

  def config(self, choice: TrainChoice) -> ml_collections.ConfigDict:
    """The experiment config `fibseg train --config=<model>` would run with these fields."""
    path = configs.path(choice.model)
    if path is None:
      raise SessionError(f"Model: {choice.model!r}; expected one of {', '.join(configs.names())}")
    config = configs.load(path)
    channels = tuple(choice.channels) or self.volume.channels
    self.volume.channel_indices(channels, "Channels")
    if choice.slices < 1 or choice.slices % 2 == 0:
      raise SessionError(f"Slices: {choice.slices}; expected an odd number, e.g. 1 or 3")
    if choice.steps < 1:
      raise SessionError(f"Steps: {choice.steps}; expected at least 1")
    config.data.path = self.root
    config.data.channels = ",".join(channels)
    config.data.slices = int(choice.slices)
    config.train.steps = int(choice.steps)
    config.train.eval_every = max(1, min(int(config.train.eval_every), choice.steps // 4 or 1))
    config.train.log_every = max(1, min(int(config.train.log_every), choice.steps // 20 or 1))
    config.train.warmup_steps = min(int(config.train.warmup_steps), choice.steps // 4)
    if choice.forest_teacher:
      config.distill.teacher = distill_lib.FOREST
    for name, value in parse_overrides(choice.overrides).items():
      section, field = name.split(".")
      if section not in config or field not in config[section]:
        raise SessionError(f"More settings: no field {name} (see --show_config)")
      try:
        config[section][field] = value
      except (TypeError, ValueError) as e:
        raise SessionError(f"More settings: {name}={value!r}: {e}") from None
    return config

  def next_workdir(self, config: ml_collections.ConfigDict) -> tuple[str, str | None]:
    """(workdir, init_from): resume the newest run while it is unfinished; otherwise a
    new run starting from the newest finished run's weights (None: from scratch)."""
    runs = self.run_dirs()
    latest = self.latest_run()
    compatible = latest is not None and self._resumable(config, latest)
    if compatible and checkpoint.latest_step(latest) < int(config.train.steps):
      return latest, self._init_of(latest)
    # A new run refines the latest one when it is the same experiment (another model,
    # channels or slab depth cannot take its weights: those start from scratch).
    init_from = latest if compatible else None
    if runs and checkpoint.latest_step(runs[-1]) is None:
      return runs[-1], init_from  # made but never saved (a failed start): use it
    number = len(runs) + 1
    while os.path.exists(os.path.join(self.runs, f"{RUN_PREFIX}{number}")):
      number += 1
    return os.path.join(self.runs, f"{RUN_PREFIX}{number}"), init_from

  @staticmethod
  def _init_of(workdir: str) -> str | None:
    saved = metrics_writer.saved_settings(workdir)
    return (saved.train.init_from or None) if saved else None

  @staticmethod
  def _resumable(config: ml_collections.ConfigDict, workdir: str) -> bool:
    try:
      loop.check_workdir(loop.prepare(config).settings, workdir)
    except ConfigError:
      return False
    return True

  def plan(self, choice: TrainChoice) -> tuple[ml_collections.ConfigDict, str]:
    """(config, run folder) that `train` uses: `config(choice)` with the run to refine
    as `train.init_from`, and the folder `next_workdir` picks."""
    if not self.volume.metadata.annotated_slices:
      raise SessionError(
        "nothing to train on: paint classes on a slice of 'annotations' and Save labels"
      )
    config = self.config(choice)
    workdir, init_from = self.next_workdir(config)
    if init_from and os.path.abspath(init_from) != os.path.abspath(workdir):
      config.train.init_from = init_from
    return config, workdir

  def train(
    self,
    choice: TrainChoice,
    stop: threading.Event | None = None,
    *,
    plan: tuple[ml_collections.ConfigDict, str] | None = None,
  ) -> tuple[str, dict[str, Any] | None]:
    """Trains (resumes, or refines the last run); returns (workdir, summary).

    The summary is None when `stop` ended the run early: its checkpoint is saved and
    the next `train` resumes it. `plan`: `plan(choice)` already made, by a caller that
    needed the run folder first.
    """
    config, workdir = plan or self.plan(choice)
    os.makedirs(workdir, exist_ok=True)
    try:
      # A distillation teacher (e.g. distill.teacher=forest for brush strokes) first.
      infer_distill.prepare_teacher(config, workdir, progress=False)
      return workdir, loop.train_and_evaluate(config, workdir, progress=False, stop=stop)
    except KeyboardInterrupt:
      if stop is not None and stop.is_set():
        return workdir, None
      raise

  @staticmethod
  def curve(workdir: str) -> dict[str, list[float]]:
    """Training loss and validation mean IoU so far (metrics.jsonl), for a live plot."""
    path = os.path.join(workdir, metrics_writer.METRICS_FILE)
    rows = metrics_writer.read_metrics(path) if os.path.exists(path) else []
    step, loss = metrics_writer.series(rows, "loss")
    val_step, val_miou = metrics_writer.series(rows, "val_miou")
    return {"step": step, "loss": loss, "val_step": val_step, "val_miou": val_miou}

  # --- prediction ---------------------------------------------------------------------

  def resolve_run(self, workdir: str | None) -> str:
    """`workdir` if it holds a checkpoint, else the newest run that does."""
    if workdir is None or checkpoint.latest_step(workdir) is None:  # none given, or never saved
      workdir = self.latest_run()
    if workdir is None:
      raise SessionError("no trained run yet: paint labels and press Train first")
    return workdir

  def preview(self, z: int, workdir: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Labels (napari values: class + 1) and uncertainty (entropy / log classes, 0-1) of
    slice z from the best checkpoint of the run, in memory."""
    restored = checkpoint.load(self.resolve_run(workdir))
    labels, probabilities = slice_lib.predict_slice(restored, self.volume, int(z))
    return labels.astype(np.uint8) + 1, blend.normalised_entropy(probabilities)

  def preview_from_strokes(
    self, z: int, channels: Sequence[str] | None = None, prior: enhance.Prior | None = None
  ) -> tuple[np.ndarray, np.ndarray]:
    """Labels (napari values: class + 1) and uncertainty (0-1) of slice z from the saved
    paint alone, with no training: a random forest fitted on every painted pixel and
    corrected by the prior (`fibseg_jax.infer.enhance`): `prior`, else the one in
    `prior_dir`, loaded once and kept.

    Raises:
      SessionError: nothing painted and saved yet, or no prior in `prior_dir`.
    """
    if not self.volume.metadata.annotated_slices:
      raise SessionError(
        "preview from strokes: nothing painted: paint classes on a slice of 'annotations' "
        "(a few strokes of each class) and Save labels"
      )
    try:
      if prior is None:
        if self._prior is None or self._prior[0] != self.prior_dir:
          self._prior = (self.prior_dir, enhance.load_prior(self.prior_dir))
        prior = self._prior[1]
      result = enhance.preview(
        self.volume, tuple(channels or self.volume.channels), [int(z)], prior=prior
      )
    except enhance.PriorError as e:
      raise SessionError(
        f"preview from strokes: {e}; {PRIOR_ENV}=<folder> names another prior"
      ) from None
    except ValueError as e:
      raise SessionError(f"preview from strokes: {e}") from None
    return result.labels[int(z)] + 1, blend.normalised_entropy(result.probabilities[int(z)])

  @staticmethod
  def output_dir(workdir: str) -> str:
    """`<run>/segmentation_step<N>`, N the checkpoint segment uses (the best by validation
    mean IoU): a run trained further segments anew beside the earlier one."""
    mngr = checkpoint.manager(os.path.join(workdir, checkpoint.CHECKPOINT_DIR), read_only=True)
    step = checkpoint.default_step(mngr)
    return os.path.join(workdir, f"segmentation_step{step}")

  def segment(
    self, workdir: str | None = None, stop: threading.Event | None = None, tta: str = "auto"
  ) -> SegmentationResult | None:
    """Segments the whole stack out of core into `output_dir` (labels and uncertainty);
    resumes a stopped segmentation, and returns a finished one as it is."""
    workdir = self.resolve_run(workdir)
    out = self.output_dir(workdir)
    os.makedirs(out, exist_ok=True)
    done, total = self.progress_of(out)
    if done == total:
      return SegmentationResult(
        output=os.path.join(out, SEGMENTATION),
        probabilities=None,
        blocks_total=total,
        blocks_assigned=total,
        blocks_skipped=total,
        blocks_done=0,
        complete=True,
        seconds=0.0,
        mpixels=0.0,
        uncertainty=os.path.join(out, UNCERTAINTY),
      )
    try:
      return segment_lib.segment_from_checkpoint(
        workdir,
        self.volume,
        output=os.path.join(out, SEGMENTATION),
        uncertainty=os.path.join(out, UNCERTAINTY),
        settings=SegmentSettings(tta=tta, progress=False),
        stop=stop,
      )
    except KeyboardInterrupt:
      if stop is not None and stop.is_set():
        return None
      raise

  def segment_progress(self, workdir: str | None = None) -> tuple[int, int]:
    """(blocks finished, blocks in all) of the run's segmentation (`progress_of`)."""
    return self.progress_of(self.output_dir(self.resolve_run(workdir)))

  def progress_of(self, out: str) -> tuple[int, int]:
    """(blocks finished, blocks in all) of the segmentation in `out`, read from its block
    markers: a GUI can poll the progress of a `segment` running in another thread."""
    total = len(tiling.plan_blocks(self.volume.shape, SegmentSettings().block))
    markers = os.path.join(out, SEGMENTATION, store.DONE_PREFIX)
    done = len(os.listdir(markers)) if os.path.isdir(markers) else 0
    return min(done, total), total

  def segmentation(self, workdir: str | None = None) -> str:
    path = os.path.join(self.output_dir(self.resolve_run(workdir)), SEGMENTATION)
    if not os.path.exists(os.path.join(path, "zarr.json")):
      raise SessionError("no segmentation of this run yet: press Segment stack first")
    return path

  def next_slices(self, workdir: str | None = None, top: int = 3) -> list[int]:
    """The slices the ranking suggests annotating next (`uncertainty.suggest`), from the
    run's segmentation; writes suggest.json and its figures beside it."""
    seg = self.segmentation(workdir)
    out = os.path.join(os.path.dirname(seg), "suggest")
    doc = uncertainty_lib.suggest(
      os.path.join(os.path.dirname(seg), UNCERTAINTY),
      out,
      annotated=self.volume.metadata.annotated_slices,
      top=top,
      kind="uncertainty",
    )
    return [int(z) for z in doc["suggested"]]

  def quantify(self, workdir: str | None = None) -> tuple[list[dict[str, Any]], str]:
    """Per-phase structure of the run's segmentation (`quantify.quantify_stack`); writes
    quantify.json and quantify.md beside it. Returns (rows, path of quantify.md)."""
    seg = self.segmentation(workdir)
    array = store.open_segmentation(seg).array
    meta = self.volume.metadata
    q = quantify_lib.quantify_stack(array, meta.classes, meta.voxel_size_nm)
    rows = [phase_row(p) for p in q.phases]
    out = os.path.dirname(seg)
    with open(os.path.join(out, "quantify.json"), "w") as f:
      json.dump(q.to_json(), f, indent=1)
    path = os.path.join(out, "quantify.md")
    with open(path, "w") as f:
      f.write(quantify_markdown(rows, q))
    return rows, path


COLUMNS = (
  ("phase", "phase"),
  ("volume_fraction", "volume fraction"),
  ("largest_cluster", "largest cluster share"),
  ("surface_density_per_um", "S_V (1/um)"),
  ("d50_nm", "size d50 (nm)"),
)


def phase_row(phase: quantify_lib.PhaseStructure) -> dict[str, Any]:
  return {
    "phase": phase.name,
    "volume_fraction": phase.volume_fraction,
    "largest_cluster": phase.connectivity.largest_fraction,
    "surface_density_per_um": phase.surface_density_per_um,
    "d50_nm": phase.sizes.d50_nm if phase.sizes else float("nan"),
  }


def format_cell(value: Any) -> str:
  if isinstance(value, str):
    return value
  if value is None or (isinstance(value, float) and np.isnan(value)):
    return "-"
  return f"{value:.4g}"


def quantify_markdown(rows: Sequence[dict[str, Any]], q: quantify_lib.Quantification) -> str:
  box = q.subvolume
  lines = [
    "# Microstructure of the segmentation",
    "",
    f"Subvolume {list(box.shape)} [z, y, x] voxels at {list(q.voxel_size_nm)} nm "
    f"(from {list(box.start)}); {q.not_segmented} voxels not segmented.",
    "",
    "| " + " | ".join(title for _, title in COLUMNS) + " |",
    "|" + " --- |" * len(COLUMNS),
  ]
  lines += ["| " + " | ".join(format_cell(r[k]) for k, _ in COLUMNS) + " |" for r in rows]
  return "\n".join(lines) + "\n"


IMAGE_GLOBS = ("*.tif", "*.tiff", "*.png")


def _slice_glob(folder: str) -> str | None:
  for pattern in IMAGE_GLOBS:
    if glob.glob(os.path.join(folder, pattern)):
      return os.path.join(folder, pattern)
  return None


def ingest_folder(
  folder: str | os.PathLike,
  *,
  classes: Sequence[str],
  voxel_size_nm: Sequence[float],
  out: str | os.PathLike | None = None,
) -> str:
  """Ingests a folder holding one subfolder of slice images (TIFF or PNG) per channel,
  named after the channel, and optionally `labels/` (255 = not annotated, as `fibseg
  ingest --labels`), into a new volume `<folder>.zarr` (never replacing anything).

  Returns:
    The volume's path.

  Raises:
    SessionError: no channel subfolders, or no class names.
    ingest.IngestError: as `fibseg ingest` (naming the file).
  """
  folder = os.fspath(folder).rstrip("/")
  if not os.path.isdir(folder):
    raise SessionError(f"Folder: {folder} is not a directory")
  channels = {}
  for name in sorted(os.listdir(folder)):
    path = os.path.join(folder, name)
    if name != "labels" and os.path.isdir(path) and _slice_glob(path):
      channels[name] = _slice_glob(path)
  if not channels:
    raise SessionError(
      f"Folder: {folder} has no subfolder of slice images (*.tif, *.tiff, *.png); expected one "
      "per channel, e.g. ICE/ and TLD/"
    )
  if not [c for c in classes if c.strip()]:
    raise SessionError("Classes: give the class names, e.g. pore,solid")
  labels = (
    _slice_glob(os.path.join(folder, "labels"))
    if os.path.isdir(os.path.join(folder, "labels"))
    else None
  )
  out = os.fspath(out) if out else f"{folder}.zarr"
  if os.path.exists(out):
    raise SessionError(f"Folder: {out} exists already; open it, or move it away to ingest again")
  plan = ingest_lib.plan_ingest(channels, labels, list(classes))
  ingest_lib.ingest(plan, out, voxel_size_nm=tuple(voxel_size_nm), progress=False)
  return out
