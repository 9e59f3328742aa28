"""fibseg_jax's sides of the benchmark: the library's train step and the bare forward pass."""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from fibseg_jax import models, xla
from fibseg_jax.bench import machine
from fibseg_jax.bench.options import NUM_CLASSES
from fibseg_jax.train import config as config_lib
from fibseg_jax.train import parallel
from fibseg_jax.train import state as state_lib


def init_key(seed: int = 0) -> jax.Array:
  """The key the parameters are drawn from: the same initializers, another bit generator.

  XLA:CPU is slow to compile a whole network's threefry draws; the "rbg" generator
  compiles about 6x faster, and the step being timed does not depend on which bits the
  weights got.
  """
  return jax.random.key(seed, impl="rbg")


def make_batch(
  batch: int, slices: int, size: int, channels: int, seed: int = 0
) -> dict[str, np.ndarray]:
  """A random slab batch and labels (no 255s: every pixel counts in both losses).

  Returns:
    {"image": float32 [batch, slices, size, size, channels],
     "labels": int32 [batch, size, size]}.
  """
  rng = np.random.default_rng(seed)
  return {
    "image": rng.standard_normal((batch, slices, size, size, channels), dtype=np.float32),
    "labels": rng.integers(0, NUM_CLASSES, (batch, size, size), dtype=np.int32),
  }


def random_variables(model: nn.Module, x_shape: Sequence[int], seed: int = 0) -> dict[str, Any]:
  """Variables of `model` for slabs of `x_shape`, drawn with numpy: nothing compiles.

  Weights ~ N(0, 1 / fan_in), biases ~ N(0, 0.1), norm scales 1, means 0, variances 1.

  Args:
    model: a flax module taking `[batch, slices, y, x, channels]`.
    x_shape: the input shape `[batch, slices, y, x, channels]`.
    seed: numpy seed.
  """
  x = jax.ShapeDtypeStruct(tuple(x_shape), jnp.float32)
  shapes = jax.eval_shape(lambda t: model.init(jax.random.key(0), t, train=False), x)
  rng = np.random.default_rng(seed)

  def fill(path, leaf):
    name = getattr(path[-1], "key", "")
    if name in ("var", "scale"):
      return np.ones(leaf.shape, leaf.dtype)
    if name == "mean":
      return np.zeros(leaf.shape, leaf.dtype)
    if name == "bias":
      return rng.normal(0, 0.1, leaf.shape).astype(leaf.dtype)
    fan_in = max(int(np.prod(leaf.shape[:-1])), 1)
    return rng.normal(0, 1 / np.sqrt(fan_in), leaf.shape).astype(leaf.dtype)

  return jax.tree_util.tree_map_with_path(fill, shapes)


def compiled_flops(compiled: Any) -> float | None:
  """FLOPs of one call of a compiled computation by XLA's cost analysis, or None.

  Installed jax returns a dict; older ones a list with one dict per program.
  """
  try:
    analysis = compiled.cost_analysis()
  except Exception:  # noqa: BLE001 - some backends have no cost analysis
    return None
  if isinstance(analysis, Sequence) and not isinstance(analysis, Mapping):
    analysis = analysis[0] if analysis else {}
  flops = (analysis or {}).get("flops")
  return float(flops) if flops is not None and flops > 0 else None


class JaxTrainStep:
  """The training step of `experiments/train.py`: jitted over a mesh, state donated.

  `prepare()` initialises the state and compiles the step ahead of time (so `flops`
  comes from the executable that is timed); each call runs one step on the same batch.

  Args:
    model_config: see `models.build`.
    batch: `make_batch` output; image [batch, slices, y, x, channels].
    total_steps: steps the optimizer schedule is set up for (warm-up + timed).
  """

  def __init__(self, model_config: Mapping[str, Any], batch: dict[str, np.ndarray], total_steps):
    self.model_config = dict(model_config)
    self._batch_np = batch
    self._total_steps = int(total_steps)
    self.params: int | None = None
    self.flops: float | None = None
    self.compile_s: float | None = None
    self._compiled = self._state = self._batch = self._metrics = None

  def device_peak(self) -> int | None:
    return machine.jax_device_peak()

  def prepare(self) -> None:
    model = models.build(self.model_config)
    config = config_lib.base_config()
    config.train.steps = self._total_steps
    config.train.warmup_steps = 1
    mesh = parallel.make_mesh()
    replicated, batch_sharding = parallel.shardings(mesh)
    tx, schedule = state_lib.make_optimizer(config_lib.parse(config).train)
    sample = jnp.zeros((1, *self._batch_np["image"].shape[1:]), jnp.float32)
    init = lambda r: state_lib.create_state(model, tx, r, sample)
    rng = init_key()
    state_sharding = jax.tree.map(lambda _: replicated, jax.eval_shape(init, rng))
    self._state = jax.jit(init, out_shardings=state_sharding)(rng)
    self.params = models.count_params(self._state.params)
    dice = float(config.train.dice_weight)
    train_step, _ = state_lib.jit_steps(
      state_lib.make_train_step(model, tx, schedule, None, dice),
      state_lib.make_eval_step(model, NUM_CLASSES, None, dice),
      state_sharding,
      batch_sharding,
    )
    self._batch = jax.device_put(self._batch_np, batch_sharding)
    jax.block_until_ready(self._state)
    start = time.perf_counter()
    self._compiled = train_step.lower(self._state, self._batch).compile()
    self.compile_s = time.perf_counter() - start
    self.flops = compiled_flops(self._compiled)

  def __call__(self) -> None:
    self._state, self._metrics = self._compiled(self._state, self._batch)
    jax.block_until_ready((self._state, self._metrics))

  @property
  def final_loss(self) -> float | None:
    """Loss of the last step run."""
    return None if self._metrics is None else float(jax.device_get(self._metrics["loss"]))

  def close(self) -> None:
    """Drops the state and executable, so the next configuration has the memory."""
    self._compiled = self._state = self._batch = self._metrics = None


class JaxForward:
  """The bare forward pass `model.apply(variables, x, train=False)`, jitted.

  Args:
    model_config: see `models.build`.
    image: float32 [batch, slices, y, x, channels]; sharded over the mesh's batch axis
      when `shard` is true.
    variables: the model's variables; default drawn with `jax.jit(model.init)` and
      `init_key()`, as a fresh model.
    shard: shard the batch over every device (the race), else put it on one device.
  """

  def __init__(
    self,
    model_config: Mapping[str, Any],
    image: np.ndarray,
    variables: Mapping[str, Any] | None = None,
    shard: bool = True,
  ):
    self.model_config = dict(model_config)
    self._image_np = image
    self._given_variables = variables
    self._shard = shard
    self.flops: float | None = None
    self.compile_s: float | None = None
    self._compiled = self._variables = self._image = None

  def device_peak(self) -> int | None:
    return machine.jax_device_peak()

  def prepare(self) -> None:
    model = models.build(self.model_config)
    if self._shard:
      _, batch_sharding = parallel.shardings(parallel.make_mesh())
      self._image = jax.device_put(self._image_np, batch_sharding)
    else:
      self._image = jax.device_put(self._image_np)
    if self._given_variables is None:
      sample = jnp.zeros((1, *self._image_np.shape[1:]), jnp.float32)
      self._variables = jax.jit(lambda r: model.init(r, sample, train=False))(init_key())
    else:
      self._variables = jax.device_put(dict(self._given_variables))
    # The library's XLA options, as segmentation's `TilePredictor` compiles the forward.
    forward = jax.jit(
      lambda v, x: model.apply(v, x, train=False), compiler_options=xla.compiler_options()
    )
    start = time.perf_counter()
    self._compiled = forward.lower(self._variables, self._image).compile()
    self.compile_s = time.perf_counter() - start
    self.flops = compiled_flops(self._compiled)

  def __call__(self) -> None:
    self._compiled(self._variables, self._image).block_until_ready()

  def close(self) -> None:
    self._compiled = self._variables = self._image = None
