"""TrainState, optimizer and the jitted data-parallel train and validation steps."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import struct

from fibseg_jax import xla
from fibseg_jax.train import losses


@struct.dataclass
class TrainState:
  """Everything that changes during training; a pure pytree (model and optimizer live outside).

  Attributes:
    step: int32 scalar.
    params: model parameters (float32).
    batch_stats: batch-norm statistics, {} for models without them.
    opt_state: optax state.
    rng: PRNG key (uint32 [2]) for dropout.
  """

  step: jax.Array
  params: Any
  batch_stats: Any
  opt_state: Any
  rng: jax.Array


def make_optimizer(config: ml_collections.ConfigDict) -> tuple[optax.GradientTransformation, Any]:
  """AdamW with linear warmup and cosine decay, and global-norm clipping.

  Returns:
    (optimizer, learning-rate schedule).
  """
  t = config.train
  warmup = int(min(t.warmup_steps, max(t.steps - 1, 0)))
  schedule = optax.warmup_cosine_decay_schedule(
    init_value=0.0,
    peak_value=t.learning_rate,
    warmup_steps=warmup,
    decay_steps=max(int(t.steps), warmup + 1),
    end_value=t.learning_rate * 0.01,
  )
  tx = optax.chain(
    optax.clip_by_global_norm(t.grad_clip) if t.grad_clip > 0 else optax.identity(),
    optax.adamw(schedule, weight_decay=t.weight_decay),
  )
  return tx, schedule


def create_state(model, tx, rng: jax.Array, sample_image: jax.Array) -> TrainState:
  """Initialises a TrainState.

  Args:
    model: flax module.
    tx: optax optimizer.
    rng: PRNG key.
    sample_image: [batch, slices, y, x, channels] with the training shape.
  """
  init_rng, rng = jax.random.split(rng)
  variables = model.init(init_rng, sample_image, train=False)
  params = variables["params"]
  return TrainState(
    step=jnp.zeros((), jnp.int32),
    params=params,
    batch_stats=variables.get("batch_stats", {}),
    opt_state=tx.init(params),
    rng=rng,
  )


def _variables(params, batch_stats) -> dict[str, Any]:
  variables = {"params": params}
  if batch_stats:
    variables["batch_stats"] = batch_stats
  return variables


def make_train_step(model, tx, schedule, class_weights: np.ndarray | None, dice_weight: float):
  """Returns train_step(state, batch) -> (state, metrics); not yet jitted.

  batch: {'image': [batch, slices, y, x, channels] float32, 'labels': [batch, y, x] int}.
  Under jit with the batch sharded over devices, the loss means and batch-norm
  statistics are global, so any device count computes the same update.
  """
  weights = None if class_weights is None else jnp.asarray(class_weights, jnp.float32)

  def train_step(state: TrainState, batch: dict[str, jax.Array]):
    rng, dropout_rng = jax.random.split(state.rng)

    def loss_fn(params):
      logits, updates = model.apply(
        _variables(params, state.batch_stats),
        batch["image"],
        train=True,
        mutable=["batch_stats"],
        rngs={"dropout": dropout_rng},
      )
      loss, aux = losses.segmentation_loss(logits, batch["labels"], weights, dice_weight)
      return loss, (aux, updates)

    (loss, (aux, updates)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    opt_updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, opt_updates)
    new_state = state.replace(
      step=state.step + 1,
      params=params,
      batch_stats=updates.get("batch_stats", state.batch_stats),
      opt_state=opt_state,
      rng=rng,
    )
    metrics = {
      "loss": loss,
      "ce": aux["ce"],
      "dice": aux["dice"],
      "grad_norm": optax.tree.norm(grads),
      "lr": schedule(state.step),
    }
    return new_state, metrics

  return train_step


def make_eval_step(model, num_classes: int, class_weights: np.ndarray | None, dice_weight: float):
  """Returns eval_step(state, batch) -> (confusion [k, k] int32, loss sum, pixel count)."""
  weights = None if class_weights is None else jnp.asarray(class_weights, jnp.float32)

  def eval_step(state: TrainState, batch: dict[str, jax.Array]):
    logits = model.apply(_variables(state.params, state.batch_stats), batch["image"], train=False)
    labels = batch["labels"]
    cm = losses.confusion_matrix(logits, labels, num_classes)
    loss, _ = losses.segmentation_loss(logits, labels, weights, dice_weight)
    count = jnp.sum(labels != losses.IGNORE_LABEL)
    return cm, loss * count, count

  return eval_step


def jit_steps(train_step: Callable, eval_step: Callable, state_sharding, batch_sharding):
  """jit both steps over a mesh: batch sharded, state replicated, state buffers donated.

  Compiled with the library's XLA options for the mesh's platform (`fibseg_jax.xla`).
  """
  replicated = jax.sharding.NamedSharding(batch_sharding.mesh, jax.sharding.PartitionSpec())
  options = xla.compiler_options(batch_sharding.mesh.devices.flat[0].platform)
  train = jax.jit(
    train_step,
    in_shardings=(state_sharding, batch_sharding),
    out_shardings=(state_sharding, replicated),
    donate_argnums=(0,),
    compiler_options=options,
  )
  evaluate = jax.jit(
    eval_step,
    in_shardings=(state_sharding, batch_sharding),
    out_shardings=replicated,
    compiler_options=options,
  )
  return train, evaluate
