"""Peer rows of the study: MONAI's BasicUNet and nnU-Net v2's 2d configuration.

Both train on the annotated training slices with the same validation blocks held out
(the `SlabLoader` split) and are scored on the evaluation slices by `runs.score`.

  monai_basicunet    MONAI BasicUNet (2D, the budget's `unet_features`) on one slice with
                     every channel (the `unet_1_<all channels>` row's input), fed the
                     `SlabLoader`'s own training batches, so its patches are those of the
                     U-Net row; cross-entropy + Dice (ignoring 255), AdamW; the best
                     validation checkpoint segments the evaluation slices with MONAI's
                     `sliding_window_inference`.
  nnunetv2_2d_small  nnU-Net v2's 2d configuration, planned by nnU-Net's own
                     `ExperimentPlanner` with the patch capped at the budget's patch (the
                     "small" plan), trained on fold "all" for the networks' samples seen.
  nnunetv2_2d        the same with nnU-Net's plan left as it is (the "own" plan: on a CPU
                     hours for the quick budget, so it runs only when --rows names it).

torch, monai and nnunetv2 are the `peers` extra (`INSTALL`); a row whose modules do not
import is skipped with a line that says so. nnU-Net runs in a child process
(`CHILD`, given the job file) with nnUNet_raw, nnUNet_preprocessed and
nnUNet_results under the run directory, since nnU-Net reads them from the environment
and starts worker processes of its own.

The nnU-Net raw dataset is one case per training slice, each channel a 2D .tif
(`case_0005_0000.tif`, ...), read by nnU-Net's `NaturalImage2DIO` (2D .png/.bmp/.tif,
one grey file per channel; spacing 999 x 1 x 1). Unannotated pixels (255) and the
validation blocks become nnU-Net's ignore label, the highest label value.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import math
import os
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import tifffile

from fibseg_jax.bench import peer as bench_peer
from fibseg_jax.data import loader as loader_lib
from fibseg_jax.data import volume as volume_lib
from fibseg_jax.study import budget as budget_lib
from fibseg_jax.study import runs

MONAI = "monai_basicunet"
NNUNET_SMALL = "nnunetv2_2d_small"
NNUNET_OWN = "nnunetv2_2d"
INSTALL = (
  "`pip install -e '.[peers]'` (torch==2.13.0 monai==1.6.1 nnunetv2==2.8.1; best in a venv "
  "of its own, e.g. /work/venv_peers)"
)
DATASET = "Dataset001_fibseg"
FILE_ENDING = ".tif"
# The nnU-Net child. Run by -c, not -m: nnU-Net's spawned workers then do not re-import
# this module (and jax with it) as their __main__.
CHILD = "import sys; from fibseg_jax.study import peers; peers.main(sys.argv)"
# BasicUNet pools four times.
BASICUNET_MULTIPLE = 16


@dataclasses.dataclass(frozen=True)
class Peer:
  """A peer row's recipe.

  Attributes:
    name: the row name.
    architecture: what the table's architecture column shows.
    modules: what must import for the row to run.
    plan: nnU-Net's plan, "own" or "small"; "" for MONAI.
    default: run when no --rows pattern is given.
  """

  name: str
  architecture: str
  modules: tuple[str, ...]
  plan: str = ""
  default: bool = True


PEERS = (
  Peer(MONAI, "basicunet", ("torch", "monai", "monai.networks.nets", "monai.inferers")),
  Peer(NNUNET_SMALL, "nnunetv2", ("torch", "nnunetv2"), plan="small"),
  Peer(NNUNET_OWN, "nnunetv2", ("torch", "nnunetv2"), plan="own", default=False),
)
BY_NAME = {p.name: p for p in PEERS}


def missing(
  peer: Peer,
  budget: budget_lib.Budget | None = None,
  importer: Callable[[str], Any] = importlib.import_module,
) -> str:
  """Why `peer` cannot run ("" when it can): a module that does not import, or a budget
  whose U-Net widths BasicUNet cannot take.

  Args:
    peer: the row.
    budget: the study's budget; None skips the widths check.
    importer: imports a module by name (tests pass one that fails).
  """
  for module in peer.modules:
    try:
      importer(module)
    except ImportError as e:
      return f"{peer.name}: skipped, cannot import {module} ({e}); install it with {INSTALL}"
  if peer.name == MONAI and budget is not None and len(budget.unet_features) != 6:
    return (
      f"{peer.name}: skipped, BasicUNet takes six widths and budget {budget.name}'s "
      f"unet_features are {list(budget.unet_features)}"
    )
  return ""


def selected(peer: Peer, patterns: Sequence[str] | None, select: Callable[..., bool]) -> bool:
  """Whether the study runs `peer`: a --rows pattern matches it, or none is given and it is
  a default row."""
  return select(peer.name, patterns) if patterns else peer.default


def open_loader(
  budget: budget_lib.Budget,
  vol: volume_lib.Volume,
  *,
  channels: Sequence[str],
  seed: int,
  held_out: Sequence[int],
  size_multiple: int = 1,
) -> loader_lib.SlabLoader:
  """The loader of the `unet_1_<channels>` row: its split, its patches, its batches."""
  from fibseg_jax.train import config as config_lib  # noqa: PLC0415
  from fibseg_jax.train import data_config  # noqa: PLC0415

  config = runs.network_config(
    budget,
    architecture="unet",
    channels=channels,
    slices=1,
    seed=seed,
    volume=volume_lib.local_path(vol.root) or "",
    held_out=held_out,
  )
  return loader_lib.SlabLoader(
    vol,
    data_config.loader_config(config_lib.parse(config), size_multiple=size_multiple, unlabelled=0),
  )


def normalised_slice(vol: volume_lib.Volume, z: int, channels: Sequence[str]) -> np.ndarray:
  """float32 [channels, y, x]: slice z normalised as the loader normalises its patches."""
  offset, scale = vol.normalization(channels)
  image = vol.read_image(int(z))[..., vol.channel_indices(channels)].astype(np.float32)
  return np.ascontiguousarray(((image - offset) * scale).transpose(2, 0, 1))


# MONAI.


def run_monai(
  directory: str, budget: budget_lib.Budget, cell: runs.Cell, *, threads: int = 0
) -> dict[str, Any]:
  """Trains BasicUNet on the loader's batches and scores the evaluation slices.

  Args:
    directory: the run's directory (result.json, train.log).
    budget: steps, batch, patch, widths, validation interval and tiling.
    cell: the volume, input channels (one slice, every channel folded in), seed (torch's
      and the loader's training stream; the split keeps its seed, 0), the slices
      segmented and scored and those kept out of training.
    threads: torch intra-op threads; 0 keeps torch's default.

  Returns:
    The result dict (also written to `directory/result.json`).
  """
  import torch  # noqa: PLC0415
  from monai import losses as monai_losses  # noqa: PLC0415
  from monai.inferers import sliding_window_inference  # noqa: PLC0415
  from monai.networks.nets import BasicUNet  # noqa: PLC0415

  from fibseg_jax.eval import metrics  # noqa: PLC0415

  vol, channels, seed, eval_slices, held_out = cell
  features = tuple(budget.unet_features)
  if len(features) != 6:
    raise ValueError(missing(BY_NAME[MONAI], budget, importer=lambda name: None))
  if threads:
    torch.set_num_threads(threads)
  os.makedirs(directory, exist_ok=True)
  k = len(vol.classes)
  torch.manual_seed(seed)
  net = BasicUNet(spatial_dims=2, in_channels=len(channels), out_channels=k, features=features)
  loss_fn, optimizer = bench_peer.monai_training(torch, monai_losses, net)
  best, best_iou, best_step = None, -1.0, 0

  def validate(loader: loader_lib.SlabLoader) -> float:
    net.eval()
    confusion = np.zeros((k, k), np.int64)
    with torch.inference_mode():
      for batch in loader.validation_batches():
        logits = net(torch.from_numpy(bench_peer.as_features_first(batch["image"])))
        confusion += metrics.confusion_matrix(batch["labels"], logits.argmax(1).numpy(), k)
    net.train()
    return float(metrics.metrics_from_confusion(confusion).mean_iou)

  start = time.perf_counter()
  loader = open_loader(
    budget, vol, channels=channels, seed=seed, held_out=held_out, size_multiple=BASICUNET_MULTIPLE
  )
  with loader:
    net.train()
    for step, batch in zip(range(1, budget.steps + 1), loader.batches(), strict=False):
      image = torch.from_numpy(bench_peer.as_features_first(batch["image"]))
      labels = torch.from_numpy(batch["labels"].astype(np.int64))
      optimizer.zero_grad(set_to_none=True)
      logits = net(image)
      loss = loss_fn(logits, labels)
      bench_peer.monai_update(torch, net, optimizer, loss)
      if step % budget.eval_every == 0 or step == budget.steps:
        iou = validate(loader)
        loss_value = float(loss.detach())
        with open(os.path.join(directory, "train.log"), "a") as f:
          f.write(
            f"step {step}: loss {loss_value:.4f}, validation mean IoU {iou:.4f}, "
            f"{time.perf_counter() - start:.1f} s\n"
          )
        if best is None or iou > best_iou:  # the first validation even if NaN
          best_iou, best_step = iou, step
          best = {n: t.detach().clone() for n, t in net.state_dict().items()}
  train_seconds = time.perf_counter() - start
  net.load_state_dict(best)
  net.eval()
  start = time.perf_counter()
  predictions = {}
  with torch.inference_mode():
    for z in eval_slices:
      image = torch.from_numpy(normalised_slice(vol, z, channels))[None]
      logits = sliding_window_inference(
        image,
        roi_size=(budget.tile, budget.tile),
        sw_batch_size=budget.infer_batch,
        predictor=net,
        overlap=budget.overlap / budget.tile,
        mode="gaussian",
      )
      predictions[int(z)] = logits.argmax(1)[0].numpy().astype(np.uint8)
  segment_seconds = time.perf_counter() - start
  _, height, width = vol.shape
  result = {
    "seed": int(seed),
    "params": int(sum(p.numel() for p in net.parameters())),
    "train_seconds": train_seconds,
    "best_step": best_step,
    "segment_seconds": segment_seconds,
    "segment_mpixels": len(eval_slices) * height * width / 1e6,
    "peer": {
      "recipe": bench_peer.MONAI_RECIPE,
      "features": list(features),
      "slices": 1,
      "channels": list(channels),
      "patch": budget.patch,
      "batch_size": budget.batch_size,
      "iterations": budget.steps,
      "validation_mean_iou": best_iou if np.isfinite(best_iou) else None,
      "inference": f"sliding_window_inference roi {budget.tile}, overlap "
      f"{budget.overlap / budget.tile:.3g}, gaussian",
    },
    **runs.score(runs.read_truths(vol, eval_slices), predictions, vol.classes),
  }
  runs.write_json(os.path.join(directory, runs.RESULT), result)
  return result


# nnU-Net.


def label_names(classes: Sequence[str]) -> dict[str, int]:
  """nnU-Net's label dict: class 0 is "background", then the classes, then "ignore"."""
  names = {"background": 0}
  for i, c in enumerate(classes[1:], 1):
    name = c if c not in names and c != "ignore" else f"{c}_{i}"
    names[name] = i
  names["ignore"] = len(classes)
  return names


def nnunet_labels(labels: np.ndarray, validation: np.ndarray, num_classes: int) -> np.ndarray:
  """uint8 [y, x] nnU-Net training labels: 255 and the validation pixels become `num_classes`.

  Args:
    labels: [y, x] uint8, 255 = not annotated.
    validation: [y, x] bool, the validation blocks.
    num_classes: C, which is nnU-Net's ignore label here.
  """
  out = labels.astype(np.uint8, copy=True)
  out[(labels == loader_lib.IGNORE_LABEL) | (labels >= num_classes) | validation] = num_classes
  return out


def write_case(folder: str, case: str, image: np.ndarray) -> None:
  """Writes one case's channels, [y, x, channels], as `case_0000.tif`, `case_0001.tif`, ..."""
  os.makedirs(folder, exist_ok=True)
  for c in range(image.shape[-1]):
    tifffile.imwrite(
      os.path.join(folder, f"{case}_{c:04d}{FILE_ENDING}"), np.ascontiguousarray(image[..., c])
    )


def write_nnunet_dataset(
  raw: str,
  vol: volume_lib.Volume,
  split: Any,
  *,
  channels: Sequence[str],
  eval_slices: Sequence[int],
) -> dict[str, Any]:
  """Writes the training slices as an nnU-Net v2 raw dataset `raw/DATASET`.

  imagesTr/case_<z>_<channel>.tif (raw intensities: nnU-Net z-scores them itself),
  labelsTr/case_<z>.tif with unannotated and validation pixels as the ignore label, and
  imagesTs/ with the evaluation slices.

  Args:
    raw: nnUNet_raw.
    vol: the volume.
    split: the loader's `split.Split` (its `train_slices` and `val_pixels`).
    channels: channels written, in order (_0000, _0001, ...).
    eval_slices: slices written to imagesTs.

  Returns:
    The dataset.json document.
  """
  root = os.path.join(raw, DATASET)
  index = vol.channel_indices(channels)
  k = len(vol.classes)
  _, height, width = vol.shape
  for z in split.train_slices:
    write_case(os.path.join(root, "imagesTr"), f"case_{z:04d}", vol.read_image(int(z))[..., index])
    labels = nnunet_labels(vol.read_labels(int(z)), split.val_pixels(z, 0, height, 0, width), k)
    os.makedirs(os.path.join(root, "labelsTr"), exist_ok=True)
    tifffile.imwrite(os.path.join(root, "labelsTr", f"case_{z:04d}{FILE_ENDING}"), labels)
  for z in eval_slices:
    write_case(os.path.join(root, "imagesTs"), f"case_{z:04d}", vol.read_image(int(z))[..., index])
  dataset = {
    "channel_names": {str(i): c for i, c in enumerate(channels)},
    "labels": label_names(vol.classes),
    "numTraining": len(split.train_slices),
    "file_ending": FILE_ENDING,
    "overwrite_image_reader_writer": "NaturalImage2DIO",
  }
  runs.write_json(os.path.join(root, "dataset.json"), dataset)
  return dataset


def nnunet_environment(directory: str) -> dict[str, str]:
  """nnUNet_raw, nnUNet_preprocessed and nnUNet_results under the run directory."""
  return {
    "nnUNet_raw": os.path.join(directory, "nnUNet_raw"),
    "nnUNet_preprocessed": os.path.join(directory, "nnUNet_preprocessed"),
    "nnUNet_results": os.path.join(directory, "nnUNet_results"),
  }


def run_nnunet(
  directory: str,
  budget: budget_lib.Budget,
  cell: runs.Cell,
  *,
  plan: str,
  threads: int = 0,
  iterations: int | None = None,
  python: str = sys.executable,
) -> dict[str, Any]:
  """Plans, preprocesses and trains nnU-Net's 2d configuration, predicts and scores.

  Args:
    directory: the run's directory (nnU-Net's folders, job.json, train.log, result.json).
    budget: steps x batch_size is the number of samples nnU-Net sees; patch caps the
      "small" plan's patch.
    cell: the volume, channels (as _0000, _0001, ...), seed (torch's and numpy's in the
      child process), the slices predicted and scored and those kept out of training.
    plan: "own" (nnU-Net's plan) or "small" (its planner, patch capped at budget.patch).
    threads: torch intra-op threads of the child; 0 keeps torch's default.
    iterations: training iterations; None: budget samples / nnU-Net's batch size (tests).
    python: the interpreter of the child.

  Returns:
    The result dict (also written to `directory/result.json`).

  Raises:
    RuntimeError: the child failed (its output is in `directory/train.log`).
  """
  if plan not in ("own", "small"):
    raise ValueError(f"nnU-Net plan {plan!r}: expected own or small")
  vol, channels, seed, eval_slices, held_out = cell
  os.makedirs(directory, exist_ok=True)
  env = nnunet_environment(directory)
  with open_loader(budget, vol, channels=channels, seed=seed, held_out=held_out) as loader:
    dataset = write_nnunet_dataset(
      env["nnUNet_raw"], vol, loader.split, channels=channels, eval_slices=eval_slices
    )
  job = {
    "plan": plan,
    "patch": budget.patch,
    "samples": budget.steps * budget.batch_size,
    "iterations": iterations,
    "seed": int(seed),
    "threads": int(threads),
    "eval_cases": [f"case_{int(z):04d}" for z in eval_slices],
    "num_channels": len(channels),
    "output": os.path.join(directory, "predictions"),
  }
  job_path = os.path.join(directory, "job.json")
  runs.write_json(job_path, job)
  child_env = {**os.environ, **env, "nnUNet_n_proc_DA": os.environ.get("nnUNet_n_proc_DA", "1")}
  with open(os.path.join(directory, "train.log"), "a") as log:
    done = subprocess.run(
      [python, "-c", CHILD, job_path],
      env=child_env,
      stdout=log,
      stderr=subprocess.STDOUT,
      check=False,
    )
  if done.returncode:
    raise RuntimeError(
      f"nnU-Net failed (exit {done.returncode}); see {os.path.join(directory, 'train.log')}"
    )
  with open(os.path.join(job["output"], "job_result.json")) as f:
    child = json.load(f)
  predictions = {
    int(z): np.load(os.path.join(job["output"], f"case_{int(z):04d}.npy")) for z in eval_slices
  }
  _, height, width = vol.shape
  result = {
    "seed": int(seed),
    "params": child["params"],
    "train_seconds": child["train_seconds"],
    "segment_seconds": child["segment_seconds"],
    "segment_mpixels": len(eval_slices) * height * width / 1e6,
    "peer": {
      "recipe": "nnU-Net v2 nnUNetTrainer defaults, fold all, device cpu",
      "plan": plan,
      "plan_note": "nnU-Net's own ExperimentPlanner"
      if plan == "own"
      else f"nnU-Net's ExperimentPlanner with the patch capped at {budget.patch}",
      "labels": dataset["labels"],
      **{k: v for k, v in child.items() if k not in ("params", "train_seconds")},
    },
    **runs.score(runs.read_truths(vol, eval_slices), predictions, vol.classes),
  }
  runs.write_json(os.path.join(directory, runs.RESULT), result)
  return result


def _nnunet_job(job: Mapping[str, Any]) -> None:
  """The child process: fingerprint, plan, preprocess, train, predict (nnU-Net's API)."""
  import random  # noqa: PLC0415

  import torch  # noqa: PLC0415
  from nnunetv2.experiment_planning import plan_and_preprocess_api as api  # noqa: PLC0415
  from nnunetv2.experiment_planning.experiment_planners.default_experiment_planner import (  # noqa: PLC0415
    ExperimentPlanner,
  )
  from nnunetv2.imageio.natural_image_reader_writer import NaturalImage2DIO  # noqa: PLC0415
  from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor  # noqa: PLC0415
  from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer  # noqa: PLC0415

  if job["threads"]:
    torch.set_num_threads(job["threads"])
  patch = int(job["patch"])

  class SmallPatchPlanner(ExperimentPlanner):
    """nnU-Net's planner, starting its 2d patch search from at most patch x patch."""

    def get_plans_for_configuration(self, spacing, median_shape, *args, **kwargs):
      if len(spacing) == 2:
        median_shape = np.minimum(np.asarray(median_shape), patch)
      return super().get_plans_for_configuration(spacing, median_shape, *args, **kwargs)

  # The dataset is ours (`write_nnunet_dataset`, tested); nnU-Net's integrity check would
  # cost another pool of spawned workers.
  start = time.perf_counter()
  api.extract_fingerprints([1], num_processes=1, verbose=False)
  planner_class = ExperimentPlanner if job["plan"] == "own" else SmallPatchPlanner
  plans_name = "nnUNetPlans" if job["plan"] == "own" else f"nnUNetPlans_patch{patch}"
  planner_class(1, plans_name=plans_name).plan_experiment()
  api.preprocess([1], plans_name, configurations=("2d",), num_processes=(1,), verbose=False)
  preprocessed = os.path.join(os.environ["nnUNet_preprocessed"], DATASET)
  with open(os.path.join(preprocessed, f"{plans_name}.json")) as f:
    plans = json.load(f)
  plan_seconds = time.perf_counter() - start
  batch_size = int(plans["configurations"]["2d"]["batch_size"])
  total = job["iterations"] or max(1, math.ceil(job["samples"] / batch_size))
  epochs = math.ceil(total / 250)
  per_epoch = math.ceil(total / epochs)

  class FibsegTrainer(nnUNetTrainer):
    """nnUNetTrainer with the study's iteration budget (everything else nnU-Net's)."""

    # nnUNetTrainer records its init arguments by the names of this signature.
    def __init__(self, plans, configuration, fold, dataset_json, device=torch.device("cpu")):
      super().__init__(plans, configuration, fold, dataset_json, device)
      self.num_epochs = epochs
      self.num_iterations_per_epoch = per_epoch
      # Fold "all" validates on the training cases: a pseudo-Dice log, not a held-out score.
      self.num_val_iterations_per_epoch = 1

  random.seed(job["seed"])
  np.random.seed(job["seed"])
  torch.manual_seed(job["seed"])
  with open(os.path.join(preprocessed, "dataset.json")) as f:
    dataset_json = json.load(f)
  plans["continue_training"] = False  # what nnunetv2.run.run_training adds
  trainer = FibsegTrainer(plans, "2d", "all", dataset_json, device=torch.device("cpu"))
  start = time.perf_counter()
  trainer.run_training()
  train_seconds = time.perf_counter() - start

  trainer.set_deep_supervision_enabled(False)
  trainer.network.eval()
  predictor = nnUNetPredictor(
    tile_step_size=0.5,
    use_gaussian=True,
    use_mirroring=True,
    perform_everything_on_device=False,
    device=torch.device("cpu"),
    verbose=False,
    allow_tqdm=False,
  )
  predictor.manual_initialization(
    trainer.network,
    trainer.plans_manager,
    trainer.configuration_manager,
    [trainer.network.state_dict()],
    trainer.dataset_json,
    type(trainer).__name__,
    trainer.inference_allowed_mirroring_axes,
  )
  os.makedirs(job["output"], exist_ok=True)
  images = os.path.join(os.environ["nnUNet_raw"], DATASET, "imagesTs")
  reader = NaturalImage2DIO()
  start = time.perf_counter()
  for case in job["eval_cases"]:
    files = [
      os.path.join(images, f"{case}_{c:04d}{FILE_ENDING}") for c in range(job["num_channels"])
    ]
    image, properties = reader.read_images(files)
    seg = predictor.predict_single_npy_array(image, properties, None, None, False)
    np.save(os.path.join(job["output"], f"{case}.npy"), np.asarray(seg)[0].astype(np.uint8))
  segment_seconds = time.perf_counter() - start
  config = plans["configurations"]["2d"]
  architecture = config.get("architecture", {}).get("arch_kwargs", {})
  runs.write_json(
    os.path.join(job["output"], "job_result.json"),
    {
      "params": int(sum(p.numel() for p in trainer.network.parameters())),
      "train_seconds": train_seconds,
      "segment_seconds": segment_seconds,
      "plan_seconds": plan_seconds,
      "plans_name": plans_name,
      "patch": [int(p) for p in config["patch_size"]],
      "batch_size": batch_size,
      "n_stages": architecture.get("n_stages"),
      "features_per_stage": architecture.get("features_per_stage"),
      "iterations": epochs * per_epoch,
      "epochs": epochs,
      "iterations_per_epoch": per_epoch,
      "seconds_per_iteration": train_seconds / (epochs * per_epoch),
      "inference": "nnUNetPredictor: gaussian, step 0.5, mirroring, checkpoint final",
    },
  )


# The study's side.


def run_peer(
  peer: Peer, directory: str, budget: budget_lib.Budget, cell: runs.Cell
) -> dict[str, Any]:
  """Runs one seed of a peer row (see `run_monai`, `run_nnunet`)."""
  if peer.name == MONAI:
    return run_monai(directory, budget, cell)
  return run_nnunet(directory, budget, cell, plan=peer.plan)


def notes(rows: Sequence[Mapping[str, Any]]) -> list[str]:
  """study.md lines saying how each finished peer row was trained."""
  lines = []
  for row in rows:
    peer = (row.get("runs") or [{}])[0].get("peer")
    if not peer:
      continue
    if "plan" in peer:
      what = (
        f"plan {peer['plan']} ({peer['plan_note']}): patch {peer['patch']}, batch "
        f"{peer['batch_size']}, {peer['n_stages']} stages {peer['features_per_stage']}, "
        f"{row['params']:,} parameters, {peer['iterations']} iterations ({peer['epochs']} "
        f"epochs x {peer['iterations_per_epoch']}, {peer['seconds_per_iteration']:.2f} s each)"
      )
    else:
      what = (
        f"{peer['recipe']}; widths {peer['features']}, {peer['slices']} slice x "
        f"{'+'.join(peer['channels'])}, patch {peer['patch']}, batch {peer['batch_size']}, "
        f"{peer['iterations']} steps; {peer['inference']}"
      )
    lines.append(f"- {row['name']}: {what}.")
  return ["", "Peer rows:", "", *lines] if lines else []


def main(argv: Sequence[str]) -> None:
  """The nnU-Net child process: `python -c CHILD JOB.json`."""
  with open(argv[1]) as f:
    _nnunet_job(json.load(f))
