"""One benchmark run: every section, in an order that keeps the figures honest."""

from __future__ import annotations

import dataclasses
import gc
import importlib
import sys
import tempfile
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from fibseg_jax.bench import (
  data_path,
  figures,
  jax_side,
  machine,
  peer,
  segment_memory,
  segment_race,
  timing,
)
from fibseg_jax.bench.options import (
  RACE,
  STUDY,
  STUDY_BY_NAME,
  BenchmarkError,
  Options,
  StudyConfig,
  check_options,
  model_config,
  shapes,
)


def _say(message: str) -> None:
  print(f"{message} (load average {machine.load_average()})", file=sys.stderr, flush=True)


def _check_same_network(sides: Mapping[str, Any]) -> Callable[[], None]:
  def check() -> None:
    counts = {name: side.params for name, side in sides.items()}
    if len(set(counts.values())) > 1:
      raise BenchmarkError(
        f"parameter counts differ {counts}: the race needs the same BasicUNet layout on "
        "both sides (drop model overrides or use --peer=none)"
      )

  return check


def _study_batch(options: Options, config: StudyConfig):
  return jax_side.make_batch(options.batch, config.slices, options.size, len(config.channels))


def _train_entry(options: Options, config: StudyConfig, side, timed: dict[str, Any]):
  entry = {
    "model": config.model,
    "slices": config.slices,
    "channels": list(config.channels),
    "params": side.params,
    "final_loss": side.final_loss,
    **timed,
    **timing.throughput(timed["step_s_median"], options.batch, options.size),
  }
  if isinstance(side, jax_side.JaxTrainStep):
    entry.update(flops=side.flops, compile_s=side.compile_s)
  return entry


def _race_train(options: Options, the_peer: peer.Peer, device: str | None) -> dict[str, Any]:
  """fibseg_jax's U-Net train step against MONAI's, alternating; the RACE study entry."""
  config = STUDY_BY_NAME[RACE]
  batch = _study_batch(options, config)
  unet = model_config(options, config.model)
  sides: dict[str, Any] = {
    "fibseg_jax": jax_side.JaxTrainStep(unet, batch, options.warmup + options.steps)
  }
  if the_peer.available:
    sides["monai"] = peer.TorchTrainStep(the_peer, unet["features"], batch, device, options.dtype)
  results = timing.race(sides, options.steps, options.warmup, _check_same_network(sides))
  out = {name: _train_entry(options, config, sides[name], r) for name, r in results.items()}
  for side in sides.values():
    side.close()
  return out


def _race_infer(options: Options, the_peer: peer.Peer, device: str | None) -> dict[str, Any]:
  """fibseg_jax's U-Net forward against MONAI's, alternating."""
  config = STUDY_BY_NAME[RACE]
  image = _study_batch(options, config)["image"]
  unet = model_config(options, config.model)
  sides: dict[str, Any] = {"fibseg_jax": jax_side.JaxForward(unet, image)}
  if the_peer.available:
    sides["monai"] = peer.TorchForward(the_peer, unet["features"], image, device, options.dtype)
  results = timing.race(sides, options.steps, options.warmup)
  out = {}
  for name, r in results.items():
    out[name] = {**r, **timing.throughput(r["step_s_median"], options.batch, options.size)}
    if name == "fibseg_jax":
      out[name].update(flops=sides[name].flops, compile_s=sides[name].compile_s)
    sides[name].close()
  return out


def _study(options: Options, race_entry: dict[str, Any]) -> dict[str, Any]:
  """Train step times of every study configuration (the race's is reused)."""
  study = {}
  for config in STUDY:
    if config.name == RACE:
      study[config.name] = race_entry
      continue
    _say(f"study: {config.name}")
    side = jax_side.JaxTrainStep(
      model_config(options, config.model),
      _study_batch(options, config),
      options.warmup + options.steps,
    )
    timed = timing.race({config.name: side}, options.steps, options.warmup)[config.name]
    study[config.name] = _train_entry(options, config, side, timed)
    side.close()
    gc.collect()
    print(
      f"  {config.name}: median step {timed['step_s_median']:.3f} s", file=sys.stderr, flush=True
    )
  return {c.name: study[c.name] for c in STUDY}


def run(
  options: Options,
  importer: Callable[[str], Any] = importlib.import_module,
  command: Sequence[str] | None = None,
) -> dict[str, Any]:
  """Every measurement, and the headline figures computed from them.

  Order: the MONAI race first (train, then infer) so its memory figures see a fresh
  process, then the other study configurations, the matmul reference, the data path,
  and the segmentation children last.

  Args:
    options: see `Options`; checked first.
    importer: how the peer is imported (see `peer.load_peer`).
    command: the command line to record; default `sys.argv`.

  Returns:
    Every key of `figures.KEY_NAMES` at the top level (a number, or None with a note in
    "notes"), then "targets", "status", "notes", "caveats", "environment", "options",
    "shapes", "load_average" and "details" (every section's measurements).

  Raises:
    BenchmarkError: see `check_options`; or the race's networks differ.
  """
  check_options(options)
  environment = machine.environment(command)
  load_start = machine.load_average()
  the_peer = peer.load_peer(options, importer)
  caveats = []
  device = None
  if the_peer.available:
    torch_device = peer.torch_setup(the_peer, options.torch_threads)
    device = torch_device["device"]
    environment["versions"]["torch"] = the_peer.torch.__version__
    environment["versions"]["monai"] = the_peer.monai.__version__
    environment["torch_device"] = torch_device
    caveats.append(
      f"peer recipe ({peer.MONAI_RECIPE}, as the study's peer row): MONAI DiceLoss(softmax, "
      "to_onehot_y, batch=True) averages Dice over every class, fibseg_jax over the classes "
      "present; the random labels hold all of them"
    )
  else:
    print(f"note: {the_peer.note}", file=sys.stderr, flush=True)
  details: dict[str, Any] = {}

  _say("race: train")
  train = _race_train(options, the_peer, device)
  _say("race: infer")
  details["race"] = {"train": train, "infer": _race_infer(options, the_peer, device)}
  details["study"] = _study(options, train["fibseg_jax"])
  _say("matmul reference")
  details["matmul"] = timing.matmul_rate(options.matmul_size)
  with tempfile.TemporaryDirectory(prefix="fibseg-bench-") as workdir:
    _say("data path")
    rows = data_path.bench_data_path(options, workdir)
    details["data_path"] = {"rows": rows, "headroom_row": data_path.headroom_row(rows)}
    _say("segmentation")
    details["segmentation"] = segment_memory.measure_segmentation(options, workdir)
    _say("segmentation: default flags, and against MONAI's sliding window")
    details["segment_race"] = segment_race.measure(options, workdir, the_peer)

  collected = figures.collect(details, options.batch, the_peer.note)
  values = collected["values"]
  if environment["jax_device"]["backend"] == "cpu":
    caveats.append(
      "CPU memory of the race is the growth of the process's resident set while each side "
      "prepares and warms up, both frameworks in one process: indicative only"
    )
  return {
    **values,
    "targets": {k.name: k.target_text for k in figures.KEYS},
    "status": {k.name: k.status(values[k.name]) for k in figures.KEYS},
    "notes": collected["notes"],
    "caveats": caveats,
    "environment": environment,
    "options": dataclasses.asdict(options),
    "shapes": shapes(options),
    "load_average": {"start": load_start, "end": machine.load_average()},
    "details": details,
  }
