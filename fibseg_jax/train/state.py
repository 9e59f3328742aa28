"""TrainState, optimizer and the jitted data-parallel train and validation steps."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import struct

from fibseg_jax import xla
from fibseg_jax.data import augment
from fibseg_jax.train import config as config_lib
from fibseg_jax.train import losses
from fibseg_jax.train.config import Semi  # the semi-supervised settings the step takes


@struct.dataclass
class TrainState:
  """Everything that changes during training; a pure pytree (model and optimizer live outside).

  Attributes:
    step: int32 scalar.
    params: model parameters (float32).
    batch_stats: batch-norm statistics, {} for models without them.
    opt_state: optax state.
    rng: PRNG key (uint32 [2]) for dropout and the semi-supervised views.
    teacher: semi-supervised training's teacher, {"params", "batch_stats"}: an
      exponential moving average of the weights; {} (no leaves) when training is
      supervised only, so such checkpoints hold no copy.
  """

  step: jax.Array
  params: Any
  batch_stats: Any
  opt_state: Any
  rng: jax.Array
  teacher: Any = struct.field(default_factory=dict)


# nnU-Net's SGD: Nesterov momentum 0.99; its poly decay exponent.
SGD_MOMENTUM = 0.99
POLY_POWER = 0.9


def peak_learning_rate(train: config_lib.TrainSettings) -> float:
  """`train.learning_rate`, times `train.init_lr_scale` when fine-tuning (`train.init_from`).

  Measured (docs/recipe.md, "Fine-tuning"): a fresh optimizer at the full peak dips on
  validation when the warm-up ends, then ends higher than a lower peak, on the stack it
  was trained on and on a new one; a lower peak dips less but learns less. The default
  scale is 1; the fine-tune's checkpoint 0 (its starting weights) keeps the dip from
  costing the best checkpoint anything (`config.parse` checks the scale is in (0, 1]).
  """
  return train.learning_rate * (train.init_lr_scale if train.init_from else 1.0)


def make_schedule(train: config_lib.TrainSettings) -> optax.Schedule:
  """Linear warm-up from 0 to the peak (`peak_learning_rate`), then `train.schedule`'s decay.

  "cosine": cosine decay to 1% of the peak at `train.steps`. "poly" (nnU-Net):
  peak * (1 - t)**0.9 with t = (step - warmup) / (steps - warmup), which is nnU-Net's
  peak * (1 - step / steps)**0.9 when there is no warm-up. "constant": the peak until
  the end (as a plain optimizer without a scheduler, e.g. the MONAI peer's).
  """
  peak = peak_learning_rate(train)
  warmup = min(train.warmup_steps, max(train.steps - 1, 0))
  decay_steps = max(train.steps, warmup + 1)
  if train.schedule == "cosine":
    return optax.warmup_cosine_decay_schedule(
      init_value=0.0,
      peak_value=peak,
      warmup_steps=warmup,
      decay_steps=decay_steps,
      end_value=peak * 0.01,
    )
  if train.schedule == "constant":
    decay = optax.constant_schedule(peak)
  else:
    decay = optax.polynomial_schedule(
      init_value=peak, end_value=0.0, power=POLY_POWER, transition_steps=decay_steps - warmup
    )
  if not warmup:
    return decay
  rise = optax.linear_schedule(init_value=0.0, end_value=peak, transition_steps=warmup)
  return optax.join_schedules([rise, decay], [warmup])


def make_optimizer(
  train: config_lib.TrainSettings,
) -> tuple[optax.GradientTransformation, Any]:
  """`train.optimizer` on `make_schedule`'s learning rate, after global-norm clipping.

  "adamw": AdamW with decoupled weight decay `train.weight_decay`. "sgd" (nnU-Net): SGD
  with Nesterov momentum 0.99 and the weight decay added to the gradient as an L2 term
  (PyTorch's SGD ``weight_decay``); nnU-Net trains it at learning rate 0.01 and weight
  decay 3e-5.

  Returns:
    (optimizer, learning-rate schedule).
  """
  schedule = make_schedule(train)
  if train.optimizer == "adamw":
    step = optax.adamw(schedule, weight_decay=train.weight_decay)
  else:
    decay = train.weight_decay
    step = optax.chain(
      optax.add_decayed_weights(decay) if decay else optax.identity(),
      optax.sgd(schedule, momentum=SGD_MOMENTUM, nesterov=True),
    )
  tx = optax.chain(
    optax.clip_by_global_norm(train.grad_clip) if train.grad_clip > 0 else optax.identity(),
    step,
  )
  return tx, schedule


def create_state(
  model,
  tx,
  rng: jax.Array,
  sample_image: jax.Array,
  *,
  teacher: bool = False,
  deep_supervision: bool = False,
) -> TrainState:
  """Initialises a TrainState.

  Args:
    model: flax module.
    tx: optax optimizer.
    rng: PRNG key.
    sample_image: [batch, slices, y, x, channels] with the training shape.
    teacher: also hold a teacher (semi-supervised training), starting as the student.
    deep_supervision: also create the model's deep-supervision heads (`aux_head{level}`);
      the other parameters are initialised exactly as without them.
  """
  init_rng, rng = jax.random.split(rng)
  extra = {"deep_supervision": True} if deep_supervision else {}
  variables = model.init(init_rng, sample_image, train=False, **extra)
  params = variables["params"]
  batch_stats = variables.get("batch_stats", {})
  return TrainState(
    step=jnp.zeros((), jnp.int32),
    params=params,
    batch_stats=batch_stats,
    opt_state=tx.init(params),
    rng=rng,
    teacher={"params": params, "batch_stats": batch_stats} if teacher else {},
  )


# The eight symmetries of a square, as (flip x first, then quarter turns), for [b, y, x, ...].
# The square symmetries of the y-x plane, one of which moves the student's view a step.
_D4 = augment.square_symmetries()


def semi_views(
  rng: jax.Array, strong: jax.Array
) -> tuple[jax.Array, Callable[[jax.Array], jax.Array]]:
  """Moves the student's view by a random symmetry and slab reversal (one per step).

  Args:
    rng: PRNG key.
    strong: [batch, slices, y, x, channels] with y == x.

  Returns:
    (moved view, function that maps the student's [batch, y, x, classes] logits back onto
    the unmoved pixels).
  """
  pick_rng, reverse_rng = jax.random.split(rng)
  index = jax.random.randint(pick_rng, (), 0, len(_D4))
  reverse = jax.random.bernoulli(reverse_rng)
  reversed_ = augment.apply(strong, augment.Symmetry(reverse=True), y_axis=2, slab_axis=1, xp=jnp)
  strong = jnp.where(reverse, reversed_, strong)
  flat = strong.reshape(strong.shape[0] * strong.shape[1], *strong.shape[2:])
  moves = [lambda a, g=g: augment.apply(a, g, y_axis=1, xp=jnp) for g in _D4]
  moved = jax.lax.switch(index, moves, flat).reshape(strong.shape)

  def back(logits: jax.Array) -> jax.Array:
    undo = [lambda a, g=g: augment.undo(a, g, y_axis=1, xp=jnp) for g in _D4]
    return jax.lax.switch(index, undo, logits)

  return moved, back


def _variables(params, batch_stats) -> dict[str, Any]:
  variables = {"params": params}
  if batch_stats:
    variables["batch_stats"] = batch_stats
  return variables


def make_train_step(
  model,
  tx,
  schedule,
  class_weights: np.ndarray | None,
  dice_weight: float,
  semi: Semi | None = None,
  deep_supervision: bool = False,
  distill_weight: float = 0.0,
):
  """Returns train_step(state, batch) -> (state, metrics); not yet jitted.

  batch: {'image': [batch, slices, y, x, channels] float32, 'labels': [batch, y, x] int},
  and with `semi` enabled also the unlabelled views 'weak' and 'strong'
  [unlabelled, slices, y, x, channels] of `SlabLoader.read_unlabelled`.

  Semi-supervised step: the teacher (state.teacher, inference mode) predicts the weak
  view; the student sees the strong view moved by a random square symmetry and slab
  reversal, in one forward pass with the labelled batch (so batch-norm statistics cover
  both), and its logits are moved back and pulled towards the teacher's by
  `losses.consistency`, weighted by `semi.weight` times the ramp-up. The teacher then
  follows the student by an exponential moving average. Without `semi` (or with weight
  0) the step is the supervised one and reads only 'image' and 'labels'.

  With `deep_supervision` (the state made by `create_state(..., deep_supervision=True)`)
  the supervised loss is `losses.deep_supervision_loss` over the model's decoder levels
  with nnU-Net's weights (`losses.deep_supervision_weights`); the semi-supervised loss
  still uses the full-resolution logits only.

  Distillation step (`distill_weight` > 0; the batch also holds 'strong' and the
  teacher's probabilities 'teacher' [unlabelled, y, x, classes] of the same patches,
  moved with them by the loader): the student sees the strong view in one forward pass
  with the labelled batch, and `losses.soft_cross_entropy` to the teacher, times
  `distill_weight`, is added to the supervised loss. Weight 0 is the supervised step.

  Under jit with the batch sharded over devices, the loss means and batch-norm
  statistics are global, so any device count computes the same update.
  """
  weights = None if class_weights is None else jnp.asarray(class_weights, jnp.float32)
  semi = semi if semi is not None and semi.enabled else None
  level_weights = losses.deep_supervision_weights(model.config.depth) if deep_supervision else None
  distill = float(distill_weight) > 0
  if distill and semi is not None:
    raise ValueError("distillation and semi-supervised training are alternatives, not both")

  def train_step(state: TrainState, batch: dict[str, jax.Array]):
    rng, dropout_rng = jax.random.split(state.rng)
    image, labelled = batch["image"], batch["image"].shape[0]
    if semi is not None:
      moved, back = semi_views(jax.random.fold_in(dropout_rng, 1), batch["strong"])
      image = jnp.concatenate([image, moved.astype(image.dtype)], 0)
      teacher_logits = model.apply(
        _variables(state.teacher["params"], state.teacher["batch_stats"]),
        batch["weak"],
        train=False,
      )
    if distill:
      image = jnp.concatenate([image, batch["strong"].astype(image.dtype)], 0)

    def loss_fn(params):
      outputs, updates = model.apply(
        _variables(params, state.batch_stats),
        image,
        train=True,
        mutable=["batch_stats"],
        rngs={"dropout": dropout_rng},
        **({"deep_supervision": True} if deep_supervision else {}),
      )
      if deep_supervision:
        logits = outputs[0]
        loss, aux = losses.deep_supervision_loss(
          [o[:labelled] for o in outputs], batch["labels"], level_weights, weights, dice_weight
        )
      else:
        logits = outputs
        loss, aux = losses.segmentation_loss(
          logits[:labelled], batch["labels"], weights, dice_weight
        )
      if semi is not None:
        unsup, teaching = losses.consistency(
          back(logits[labelled:]), teacher_logits, semi.mode, semi.threshold, weights
        )
        aux = {**aux, "unsup": unsup, "teaching": teaching}
        loss = loss + semi.weight * semi.ramp(state.step) * unsup
      if distill:
        taught = losses.soft_cross_entropy(logits[labelled:], batch["teacher"])
        aux = {**aux, "distill": taught}
        loss = loss + float(distill_weight) * taught
      return loss, (aux, updates)

    (loss, (aux, updates)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    opt_updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, opt_updates)
    batch_stats = updates.get("batch_stats", state.batch_stats)
    teacher = state.teacher
    if semi is not None:
      follow = lambda t, s: semi.ema * t + (1.0 - semi.ema) * s  # noqa: E731
      teacher = jax.tree.map(follow, teacher, {"params": params, "batch_stats": batch_stats})
    new_state = state.replace(
      step=state.step + 1,
      params=params,
      batch_stats=batch_stats,
      opt_state=opt_state,
      rng=rng,
      teacher=teacher,
    )
    metrics = {
      **aux,
      "loss": loss,
      "grad_norm": optax.tree.norm(grads),
      "lr": schedule(state.step),
    }
    return new_state, metrics

  return train_step


def make_eval_step(model, num_classes: int, class_weights: np.ndarray | None, dice_weight: float):
  """Returns eval_step(state, batch) -> (confusion [k, k] int32, loss sum, pixel count).

  The full-resolution logits of the inference network only, with or without deep
  supervision in training (its heads, if any, are unused here).
  """
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
