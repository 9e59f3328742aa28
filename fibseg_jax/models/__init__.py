"""Segmentation networks for slabs of serial sections: U-Net and Sensor-3D.

Every model maps a slab batch `[batch, slices, y, x, channels]` (float32) to float32
logits `[batch, y, x, classes]` for the central slice, and is built from a model config:

  model = models.build({"name": "unet", "num_classes": 4, "depth": 4, ...})
  variables = model.init(rng, x, train=False)
  logits = model.apply(variables, x, train=False)
  logits, updates = model.apply(
      variables, x, train=True, mutable=["batch_stats"], rngs={"dropout": key})

Deep supervision (training only): `model.apply(variables, x, deep_supervision=True)`
returns a tuple of logits, one per `supervised_levels(config)`, full resolution first, from
extra heads under `aux_head{level}` that `init(..., deep_supervision=True)` creates.
`without_aux_heads` strips them: what remains is the inference network.

The modules are pure flax.linen with one frozen config dataclass each; this package does
no I/O. y and x must be multiples of `size_multiple(config)`, slices odd.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import numpy as np

from fibseg_jax.models import convlstm, layers
from fibseg_jax.models.checks import InputShapeError, ModelConfigError, check_slab_shape
from fibseg_jax.models.sensor3d import Sensor3D, Sensor3DConfig
from fibseg_jax.models.unet import UNet, UNetConfig

__all__ = [
  "MODELS",
  "InputShapeError",
  "ModelConfigError",
  "Sensor3D",
  "Sensor3DConfig",
  "UNet",
  "UNetConfig",
  "build",
  "check_input_shape",
  "config_from",
  "convlstm",
  "count_params",
  "default_config",
  "is_aux_head",
  "size_multiple",
  "supervised_levels",
  "without_aux_heads",
]

# name -> (config class, module class)
MODELS: dict[str, tuple[type, type[nn.Module]]] = {
  "unet": (UNetConfig, UNet),
  "sensor3d": (Sensor3DConfig, Sensor3D),
}

ModelConfig = UNetConfig | Sensor3DConfig


def _as_dict(model_config: Any) -> dict[str, Any]:
  if hasattr(model_config, "to_dict"):  # ml_collections (Frozen)ConfigDict
    return dict(model_config.to_dict())
  if isinstance(model_config, Mapping):
    return dict(model_config)
  raise ModelConfigError(
    f"model config must be a mapping with a 'name' key or a config dataclass "
    f"({', '.join(c.__name__ for c, _ in MODELS.values())}); got {type(model_config).__name__}"
  )


def _tuples(value: Any) -> Any:
  # Configs restored from JSON or set from the command line hold lists.
  if isinstance(value, list | tuple):
    return tuple(_tuples(v) for v in value)
  return value


def config_from(model_config: Any) -> ModelConfig:
  """The config dataclass described by a model config.

  Args:
    model_config: a mapping or ml_collections ConfigDict with 'name' (one of `MODELS`)
      and any fields of that model's config (the others keep their defaults), or a
      config dataclass, returned as is.

  Returns:
    A `UNetConfig` or `Sensor3DConfig`.

  Raises:
    ModelConfigError: no or unknown name, unknown fields, or invalid field values.
  """
  if isinstance(model_config, UNetConfig | Sensor3DConfig):
    return model_config
  fields = _as_dict(model_config)
  name = fields.pop("name", None)
  if name not in MODELS:
    raise ModelConfigError(f"model.name={name!r} is not one of {tuple(MODELS)}")
  config_cls, _ = MODELS[name]
  valid = [f.name for f in dataclasses.fields(config_cls)]
  unknown = sorted(set(fields) - set(valid))
  if unknown:
    raise ModelConfigError(
      f"model.name={name!r} has no field(s) {unknown}; valid fields: {['name', *valid]}"
    )
  return config_cls(**{k: _tuples(v) for k, v in fields.items()})


def build(model_config: Any) -> nn.Module:
  """The flax module described by a model config.

  Args:
    model_config: see `config_from`.

  Returns:
    A `UNet` or `Sensor3D`; `apply(variables, x, train=...)` maps a slab batch
    `[batch, slices, y, x, channels]` to float32 logits `[batch, y, x, classes]`.

  Raises:
    ModelConfigError: see `config_from`.
  """
  config = config_from(model_config)
  for config_cls, module_cls in MODELS.values():
    if type(config) is config_cls:
      return module_cls(config)
  raise AssertionError(type(config))  # config_from returns only registered classes


def default_config(name: str) -> dict[str, Any]:
  """Every field of a model's config at its default, plus 'name'.

  Args:
    name: one of `MODELS`.

  Returns:
    A dict that `build` accepts, e.g. to start an experiment's `config.model` from.

  Raises:
    ModelConfigError: unknown name.
  """
  if name not in MODELS:
    raise ModelConfigError(f"model.name={name!r} is not one of {tuple(MODELS)}")
  config_cls, _ = MODELS[name]
  return {"name": name, **dataclasses.asdict(config_cls())}


def size_multiple(model_config: Any) -> int:
  """y and x of an input must be multiples of this (2**depth)."""
  return config_from(model_config).size_multiple


def supervised_levels(model_config: Any) -> tuple[int, ...]:
  """Decoder levels that deep supervision trains, 0 (full resolution) first.

  See `layers.supervised_levels`; `model.apply(..., deep_supervision=True)` returns one
  logits array per entry.
  """
  return layers.supervised_levels(config_from(model_config))


def is_aux_head(name: str) -> bool:
  """Whether a top-level params key is a deep-supervision head (training only)."""
  return name.startswith(layers.AUX_HEAD)


def without_aux_heads(params_or_variables: Any) -> Any:
  """A params tree (or variables dict) without the deep-supervision heads.

  What remains is the inference network, with the parameters and count of a model
  trained without deep supervision; trees without heads come back equal.

  Args:
    params_or_variables: top-level params {module name: ...}, or {'params': ..., ...}.

  Returns:
    The same kind of tree, without the `aux_head{level}` subtrees.
  """
  tree = params_or_variables
  if isinstance(tree, Mapping) and "params" in tree:
    return {**tree, "params": without_aux_heads(tree["params"])}
  return {k: v for k, v in tree.items() if not is_aux_head(k)}


def check_input_shape(model_config: Any, slices: int, y: int, x: int) -> None:
  """Checks that a slab `[slices, y, x]` fits a model, before anything is compiled.

  Args:
    model_config: see `config_from`.
    slices: slices per slab; must be odd.
    y: height in pixels; must be a multiple of `size_multiple(model_config)`.
    x: width in pixels; likewise.

  Raises:
    InputShapeError: naming the wrong size and the nearest valid sizes, e.g.
      "y=500 is not a multiple of 16 for depth 4; nearest valid sizes: 496, 512".
    ModelConfigError: see `config_from`.
  """
  check_slab_shape(config_from(model_config).depth, slices, y, x)


def count_params(params_or_variables: Any) -> int:
  """Number of scalars in a params tree (or in the 'params' of a variables dict).

  Works on concrete arrays and on `jax.eval_shape` results alike; batch statistics are
  not counted.
  """
  tree = params_or_variables
  if isinstance(tree, Mapping) and "params" in tree:
    tree = tree["params"]
  return int(sum(np.prod(leaf.shape, dtype=np.int64) for leaf in jax.tree_util.tree_leaves(tree)))
