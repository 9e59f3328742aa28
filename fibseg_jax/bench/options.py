"""What the benchmark measures: options, the quick and full presets, the study configurations."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import jax

from fibseg_jax import models
from fibseg_jax.data import lists

CHANNELS = ("ICE", "TLD")
CLASSES = ("pore", "csh", "portlandite", "clinker")
NUM_CLASSES = len(CLASSES)
PEERS = ("monai", "none")
DTYPES = ("float32", "bfloat16")


class BenchmarkError(ValueError):
  """A benchmark option that cannot work; the message names the flag."""


@dataclasses.dataclass(frozen=True)
class StudyConfig:
  """One model of the paper's study, timed as a training step.

  Attributes:
    name: e.g. "unet_both_3" (model, signals, slices), as `experiments/paper_sweep.sh`.
    model: "unet" or "sensor3d".
    slices: slices per slab.
    channels: detector signals fed to the model, e.g. ("ICE", "TLD").
  """

  name: str
  model: str
  slices: int
  channels: tuple[str, ...]


def _study() -> tuple[StudyConfig, ...]:
  configs = []
  for model, slices in (("unet", 1), ("unet", 3), ("sensor3d", 3)):
    for signals, channels in (("ice", ("ICE",)), ("both", CHANNELS)):
      configs.append(StudyConfig(f"{model}_{signals}_{slices}", model, slices, channels))
  return tuple(configs)


# U-Net 1 / 3 slices and Sensor-3D 3 slices, each on one signal (ICE) and on two (ICE, TLD).
STUDY = _study()
# The configuration raced against MONAI, timed for FLOP utilisation and loader headroom,
# segmented, and the denominator of the Sensor-3D step ratio.
RACE = "unet_both_3"
SENSOR3D = "sensor3d_both_3"
STUDY_BY_NAME = {c.name: c for c in STUDY}


@dataclasses.dataclass(frozen=True)
class Options:
  """What to measure; one field per command-line flag.

  Attributes:
    quick: the quick preset was chosen (recorded only; the fields hold its values).
    batch: training batch of every study configuration, the same for both frameworks.
    size: y = x of a training patch in pixels.
    steps: timed repetitions of each step (median reported).
    warmup: untimed repetitions first, after the compile.
    peer: "monai" races MONAI's BasicUNet in PyTorch; "none" measures fibseg_jax only.
    dtype: compute dtype of the JAX models (torch autocast dtype): float32 or bfloat16.
    torch_threads: torch intra-op threads; 0 = the cores this process may use.
    loader_shape: (z, y, x) of the generated volume the slab loader reads.
    loader_chunks: chunk y-x sizes to compare.
    loader_batches: timed batches per chunk size and cache setting.
    segment_shape: (z, y, x) of the 1x volume segmented end to end; the 4x volume has
      4 z slices.
    segment_tile: tile side of the segmentation, pixels.
    segment_overlap: tile overlap of the segmentation, pixels.
    segment_batch: tiles per forward call of the segmentation.
    segment_block: y-x side of a segmentation block (at most 512 or a multiple of 512).
    matmul_size: n of the n x n float32 matmul whose FLOP/s is the utilisation reference.
    model_overrides: fields that replace every model's defaults (tests shrink the nets).
  """

  quick: bool = False
  batch: int = 8
  size: int = 256
  steps: int = 10
  warmup: int = 2
  peer: str = "monai"
  dtype: str = "float32"
  torch_threads: int = 0
  loader_shape: tuple[int, int, int] = (8, 2048, 2048)
  loader_chunks: tuple[int, ...] = (128, 256, 512)
  loader_batches: int = 10
  segment_shape: tuple[int, int, int] = (4, 1024, 1024)
  segment_tile: int = 512
  segment_overlap: int = 64
  segment_batch: int = 4
  segment_block: int = 1024
  matmul_size: int = 2048
  model_overrides: dict[str, Any] = dataclasses.field(default_factory=dict)


# Quick finishes within 10 minutes on 2 CPU cores: smaller batches, patches, volumes and
# fewer repetitions; the networks keep their full widths, so the ratios mean the same.
QUICK = {
  "batch": 4,
  "size": 128,
  "steps": 3,
  "warmup": 1,
  "loader_shape": (5, 512, 512),
  "loader_chunks": (256,),
  "loader_batches": 3,
  "segment_shape": (2, 512, 512),
  "segment_tile": 256,
  "segment_overlap": 32,
  "segment_batch": 4,
  "segment_block": 512,
}


def make_options(quick: bool = False, **overrides: Any) -> Options:
  """The full or quick preset with some fields replaced.

  Args:
    quick: start from the quick preset.
    **overrides: `Options` fields; None leaves the preset's value (unset flags).

  Returns:
    The options (not yet checked; see `check_options`).
  """
  fields = dict(QUICK) if quick else {}
  fields.update({k: v for k, v in overrides.items() if v is not None})
  return Options(quick=quick, **fields)


def parse_ints(values: Sequence[str] | None, flag: str, count: int | None = None):
  """Comma-separated flag values as a tuple of ints (None stays None).

  Raises:
    BenchmarkError: a value is not an integer, or not `count` of them.
  """
  if values is None:
    return None
  text = ",".join(values)
  ints = lists.parse_list(
    text, int, flag=f"--{flag}", error=BenchmarkError, expected="comma-separated integers"
  )
  if count is not None and len(ints) != count:
    raise BenchmarkError(f"--{flag}={','.join(values)}: expected {count} integers (z,y,x)")
  return ints


def model_config(options: Options, model: str) -> dict[str, Any]:
  """A model's default config with the benchmark's class count, dtype and overrides."""
  config = models.default_config(model)
  config.update(num_classes=NUM_CLASSES, dtype=options.dtype, **options.model_overrides)
  return config


def check_options(options: Options) -> None:
  """Fails before anything is compiled or written, naming the flag and what it expects.

  Raises:
    BenchmarkError: an option out of range.
  """
  minimums = (
    ("batch", 1),
    ("size", 1),
    ("steps", 1),
    ("warmup", 1),
    ("torch_threads", 0),
    ("loader_batches", 1),
    ("segment_tile", 1),
    ("segment_overlap", 0),
    ("segment_batch", 1),
    ("segment_block", 1),
    ("matmul_size", 1),
  )
  for name, minimum in minimums:
    value = getattr(options, name)
    if value < minimum:
      raise BenchmarkError(f"--{name}={value}: must be an integer >= {minimum}")
  if options.peer not in PEERS:
    raise BenchmarkError(f"--peer={options.peer}: expected one of {', '.join(PEERS)}")
  if options.dtype not in DTYPES:
    raise BenchmarkError(f"--dtype={options.dtype}: expected one of {', '.join(DTYPES)}")
  if options.batch % jax.device_count():
    raise BenchmarkError(
      f"--batch={options.batch}: must be a multiple of the device count ({jax.device_count()})"
    )
  for model in sorted({c.model for c in STUDY}):
    try:
      models.check_input_shape(model_config(options, model), 3, options.size, options.size)
    except models.ModelConfigError as e:
      raise BenchmarkError(f"model overrides {options.model_overrides}: {e}") from None
    except models.InputShapeError as e:
      raise BenchmarkError(f"--size={options.size}: {e} ({model})") from None
  z, y, x = options.loader_shape
  if z < 1 or min(y, x) < options.size:
    raise BenchmarkError(
      f"--loader_shape={z},{y},{x}: needs z >= 1 and y, x at least --size={options.size}"
    )
  if not options.loader_chunks or min(options.loader_chunks) < 1:
    chunks = ",".join(str(c) for c in options.loader_chunks)
    raise BenchmarkError(f"--loader_chunks={chunks}: expected positive sizes")
  _check_segmentation(options)


def _check_segmentation(options: Options) -> None:
  z, y, x = options.segment_shape
  if min(z, y, x) < 1:
    raise BenchmarkError(f"--segment_shape={z},{y},{x}: expected positive z,y,x")
  multiple = models.size_multiple(model_config(options, "unet"))
  tile = options.segment_tile
  if tile % multiple:
    raise BenchmarkError(
      f"--segment_tile={tile}: must be a multiple of {multiple}, the U-Net's size multiple"
    )
  if options.segment_overlap >= tile:
    raise BenchmarkError(
      f"--segment_overlap={options.segment_overlap}: must be below --segment_tile={tile}"
    )
  block = options.segment_block
  if block > 512 and block % 512:
    raise BenchmarkError(f"--segment_block={block}: must be at most 512 or a multiple of 512")


def shapes(options: Options) -> dict[str, Any]:
  """The shapes every section uses, in words, for the report."""
  z, y, x = options.segment_shape
  b, p = options.batch, options.size
  return {
    "train": f"slab batch [{b}, slices, {p}, {p}, channels] -> logits [{b}, {p}, {p}, "
    f"{NUM_CLASSES}], {options.steps} timed steps after {options.warmup}",
    "race": f"{RACE}: [{b}, 3, {p}, {p}, 2] = 6 input features ([{b}, 6, {p}, {p}] for "
    f"MONAI), {options.dtype}",
    "loader": f"volume {'x'.join(map(str, options.loader_shape))} x 2 uint16, patch {p}, "
    f"3 slices, batch {b}, chunks {','.join(map(str, options.loader_chunks))}",
    "segment": f"volumes {z}x{y}x{x} and {4 * z}x{y}x{x} x 2 uint16, tile "
    f"{options.segment_tile}, overlap {options.segment_overlap}, batch "
    f"{options.segment_batch}, block {options.segment_block}",
    "matmul": f"{options.matmul_size} x {options.matmul_size} float32",
  }
