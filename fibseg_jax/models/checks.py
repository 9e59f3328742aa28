"""Checks shared by the model configs: field values and the slab shapes a model accepts.

Both run at the boundary, before anything is compiled, so a user mistake reads as one
sentence naming the field (``model.<field>``) and the values that would be accepted.
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence

NORMS = ("batch", "instance", "group", "none")
ACTIVATIONS = ("relu", "leaky_relu", "elu", "gelu", "silu")
UPSAMPLES = ("transpose", "resize")
DTYPES = ("float32", "bfloat16")


class ModelConfigError(ValueError):
  """A model config field has a value the model cannot be built from."""


class InputShapeError(ValueError):
  """A slab batch has a shape the model cannot process."""


def check_choice(field: str, value: object, choices: Sequence[str]) -> None:
  """Raises ModelConfigError unless `value` is one of `choices`."""
  if value not in choices:
    raise ModelConfigError(f"model.{field}={value!r} is not one of {tuple(choices)}")


def is_int(value: object) -> bool:
  """True for Python and numpy integers, False for bools."""
  return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def check_positive_int(field: str, value: object) -> None:
  """Raises ModelConfigError unless `value` is an integer >= 1."""
  if not is_int(value) or value < 1:
    raise ModelConfigError(f"model.{field}={value!r} must be a positive integer")


BACKBONE_FIELDS = (
  "num_classes",
  "depth",
  "features",
  "norm",
  "norm_groups",
  "activation",
  "upsample",
  "dropout",
  "dtype",
)


def check_backbone_config(config: object) -> None:
  """`check_backbone` on the shared fields of a model config dataclass."""
  check_backbone(**{name: getattr(config, name) for name in BACKBONE_FIELDS})


def check_backbone(
  *,
  num_classes: object,
  depth: object,
  features: object,
  norm: object,
  norm_groups: object,
  activation: object,
  upsample: object,
  dropout: object,
  dtype: object,
) -> None:
  """Checks the fields that the U-Net and Sensor-3D backbones share.

  Args:
    num_classes: number of output classes, >= 1.
    depth: number of 2x2 poolings, >= 1.
    features: tuple of widths, `depth + 1` entries (one per level) or `depth + 2` (plus
      the width of the top decoder level).
    norm: one of NORMS.
    norm_groups: groups for `norm="group"`; every width must be divisible by it.
    activation: one of ACTIVATIONS.
    upsample: one of UPSAMPLES.
    dropout: rate in [0, 1).
    dtype: compute dtype, one of DTYPES.

  Raises:
    ModelConfigError: naming the first field that is wrong and what it should be.
  """
  check_positive_int("num_classes", num_classes)
  check_positive_int("depth", depth)
  if not isinstance(features, tuple):
    raise ModelConfigError(f"model.features={features!r} must be a tuple of ints")
  if len(features) not in (depth + 1, depth + 2):
    raise ModelConfigError(
      f"model.features={features} has {len(features)} entries; depth {depth} needs "
      f"{depth + 1} (one width per level) or {depth + 2} (plus the top decoder width)"
    )
  for i, width in enumerate(features):
    check_positive_int(f"features[{i}]", width)
  check_choice("norm", norm, NORMS)
  if norm == "group":
    check_positive_int("norm_groups", norm_groups)
    bad = [w for w in features if w % norm_groups]
    if bad:
      raise ModelConfigError(
        f"model.norm_groups={norm_groups} does not divide the widths {bad} of "
        f"model.features={features}"
      )
  check_choice("activation", activation, ACTIVATIONS)
  check_choice("upsample", upsample, UPSAMPLES)
  if isinstance(dropout, bool) or not isinstance(dropout, numbers.Real) or not 0 <= dropout < 1:
    raise ModelConfigError(f"model.dropout={dropout!r} must be a rate in [0, 1)")
  check_choice("dtype", dtype, DTYPES)


def nearest_multiples(size: int, multiple: int) -> tuple[int, ...]:
  """The positive multiples of `multiple` on either side of `size` (one if below it)."""
  below = size // multiple * multiple
  above = below + multiple
  return (below, above) if below > 0 else (above,)


def check_slab_batch(depth: int, shape: tuple[int, ...]) -> tuple[int, int, int, int, int]:
  """Checks a slab batch's shape for a model; returns (batch, slices, y, x, channels).

  Raises:
    InputShapeError: not 5-D, or sizes that do not fit (see `check_slab_shape`).
  """
  if len(shape) != 5:
    raise InputShapeError(
      f"expected a slab batch [batch, slices, y, x, channels], got shape {tuple(shape)}"
    )
  batch, slices, y, x, channels = shape
  check_slab_shape(depth, slices, y, x)
  return batch, slices, y, x, channels


def check_slab_shape(depth: int, slices: int, y: int, x: int) -> None:
  """Checks the sizes of a slab batch `[batch, slices, y, x, channels]` for a model.

  Args:
    depth: number of 2x2 poolings of the model; y and x must be multiples of 2**depth.
    slices: slices per slab; odd, so that the slab has a central slice.
    y: slab height in pixels.
    x: slab width in pixels.

  Raises:
    InputShapeError: naming the wrong size and the valid sizes nearest to it.
  """
  if slices < 1 or slices % 2 == 0:
    raise InputShapeError(
      f"slices={slices}: a slab needs an odd number of slices (1, 3, 5, ...) so that it "
      "has a central slice to segment"
    )
  multiple = 2**depth
  for axis, size in (("y", y), ("x", x)):
    if size < 1 or size % multiple:
      nearest = ", ".join(str(s) for s in nearest_multiples(max(size, 0), multiple))
      raise InputShapeError(
        f"{axis}={size} is not a multiple of {multiple} for depth {depth}; "
        f"nearest valid sizes: {nearest}"
      )
