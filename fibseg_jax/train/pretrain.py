"""The shipped prior: an enhancer trained once on domain-randomised FIB-SEM draws.

  fibseg pretrain --workdir=runs/prior --draws=220 --steps=2500

Two resumable phases, each with a progress bar and an ETA:

1. the pool (`WORKDIR/pool/draw_NNNNNN.npz`, one file per draw, written whole): for every
   seed a random stack (`fibseg_jax.data.randomised`), brush strokes painted from its
   truth on one or two slices (over 0.3-5% of each, or one whole slice now and then), a
   random forest fitted on them exactly as `fibseg`'s forest route fits a user's strokes,
   and that forest's class probabilities on every slice of the draw. Draws are
   independent: `--workers` processes make them, and a stopped run makes only the
   missing ones.
2. the enhancer (`fibseg_jax.models.enhancer`) learns the truth from (image, forest
   probabilities) on random patches of the pool, checkpointed with orbax every
   `--save_every` steps; a stopped run resumes from its last checkpoint and reaches the
   same weights as an unbroken one.

`export` writes the inference weights (`prior.msgpack`) and their provenance
(`prior.json`: generator version, seeds, steps, the command, its time, the held-out
mean IoU of forest and enhancer, a sha256) that `fibseg_jax/prior/` ships.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import hashlib
import json
import multiprocessing
import os
import time
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

from fibseg_jax.data import annotations, randomised

# Bumped whenever `randomised` or the pool's recipe changes what a seed draws.
GENERATOR_VERSION = 1
POOL = "pool"
# Seeds of held-out draws start here, so no training seed is ever a held-out one.
HELD_OUT_SEED = 1_000_000
STROKE_FRACTION = (0.003, 0.05)  # log-uniform share of a slice painted
WHOLE_SLICE_P = 0.15  # probability that a draw is labelled as one whole slice instead


@dataclasses.dataclass(frozen=True)
class Example:
  """One pool draw.

  Attributes:
    image: [z, y, x, channels] normalised as the forest route normalises (float32 when
      made, float16 as stored).
    probabilities: [z, y, x, classes] the forest's (float32 in [0, 1] when made, uint8
      255 = 1 as stored).
    labels: [z, y, x] uint8 truth.
    painted: [z, y, x] uint8 the labels the forest was fitted on (255 = not painted).
    params: the draw's parameters plus how it was labelled.
  """

  image: np.ndarray
  probabilities: np.ndarray
  labels: np.ndarray
  painted: np.ndarray
  params: dict[str, Any]


def make_example(
  seed: int,
  shape: Sequence[int] = (4, 256, 256),
  num_classes: int | None = None,
  num_channels: int | None = None,
) -> Example:
  """Draws a stack, paints it, fits a forest on the paint and keeps its probabilities.

  Deterministic per seed, shape and the class and channel counts asked for (None: drawn).
  """
  from fibseg_jax import baselines  # noqa: PLC0415 - heavy; pool workers only

  stack = randomised.draw(seed, shape, num_classes=num_classes, num_channels=num_channels)
  rng = np.random.default_rng([int(seed), 7])
  nz = stack.labels.shape[0]
  painted = np.full(stack.labels.shape, annotations.IGNORE_LABEL, np.uint8)
  if rng.random() < WHOLE_SLICE_P:
    how = {"labelled": "whole", "slices": [0]}
    painted[0] = stack.labels[0]
  else:
    fraction = float(np.exp(rng.uniform(*np.log(STROKE_FRACTION))))
    slices = list(range(min(nz, int(rng.integers(1, 3)))))
    how = {"labelled": "strokes", "fraction": round(fraction, 4), "slices": slices}
    for z in slices:
      painted[z] = annotations.strokes(stack.labels[z], fraction, seed=[int(seed), 8, z])
  route = baselines.make_route("forest", stack.num_classes, seed=int(seed))
  route.fit([stack.image[z] for z in how["slices"]], [painted[z] for z in how["slices"]])
  probs = np.stack([route.probabilities(stack.image[z]) for z in range(nz)])
  image = np.stack([route.normalised(stack.image[z]) for z in range(nz)])
  return Example(
    image=image.astype(np.float32),
    probabilities=probs.astype(np.float32),
    labels=stack.labels,
    painted=painted,
    params={**stack.params, **how},
  )


def draw_path(workdir: str, seed: int) -> str:
  return os.path.join(workdir, POOL, f"draw_{seed:07d}.npz")


def save_example(path: str, example: Example) -> None:
  """Writes one draw whole (a temporary file renamed into place): never half a file."""
  tmp = f"{path}.partial.npz"
  np.savez_compressed(
    tmp,
    image=example.image.astype(np.float16),
    probabilities=np.rint(example.probabilities * 255).astype(np.uint8),
    labels=example.labels,
    painted=example.painted,
    params=np.array(json.dumps(example.params)),
  )
  os.replace(tmp, path)


def load_example(path: str) -> Example:
  """One pool draw as stored: image float16, probabilities uint8 (255 = 1), to save memory."""
  with np.load(path) as f:
    return Example(
      image=f["image"],
      probabilities=f["probabilities"],
      labels=f["labels"],
      painted=f["painted"],
      params=json.loads(str(f["params"])),
    )


def _make_and_save(args: tuple[str, int, tuple[int, ...], int | None, int | None]) -> int:
  workdir, seed, shape, num_classes, num_channels = args
  save_example(draw_path(workdir, seed), make_example(seed, shape, num_classes, num_channels))
  return seed


def pool_seeds(draws: int, held_out: int) -> tuple[list[int], list[int]]:
  """(training seeds, held-out seeds) of a pool."""
  return list(range(draws)), list(range(HELD_OUT_SEED, HELD_OUT_SEED + held_out))


def build_pool(
  workdir: str,
  seeds: Sequence[int],
  *,
  shape: Sequence[int] = (4, 256, 256),
  num_classes: int | None = None,
  num_channels: int | None = None,
  workers: int = 1,
  progress: bool = True,
) -> list[str]:
  """Makes the pool's missing draws (`workers` processes); returns every draw's path."""
  from tqdm import tqdm  # noqa: PLC0415

  os.makedirs(os.path.join(workdir, POOL), exist_ok=True)
  for name in os.listdir(os.path.join(workdir, POOL)):
    if name.endswith(".partial.npz"):  # a draw cut off by a stop; made again below
      os.remove(os.path.join(workdir, POOL, name))
  missing = [s for s in seeds if not os.path.isfile(draw_path(workdir, s))]
  shape = tuple(int(s) for s in shape)
  with tqdm(
    total=len(seeds),
    initial=len(seeds) - len(missing),
    desc="pool",
    unit="draw",
    disable=not progress,
  ) as bar:
    if workers <= 1:
      for seed in missing:
        _make_and_save((workdir, seed, shape, num_classes, num_channels))
        bar.update(1)
    else:
      # spawn: the parent may have started JAX, which does not survive a fork.
      context = multiprocessing.get_context("spawn")
      with concurrent.futures.ProcessPoolExecutor(workers, mp_context=context) as pool:
        jobs = [(workdir, s, shape, num_classes, num_channels) for s in missing]
        for _ in pool.map(_make_and_save, jobs):
          bar.update(1)
  return [draw_path(workdir, s) for s in seeds]


def sha256(path: str) -> str:
  digest = hashlib.sha256()
  with open(path, "rb") as f:
    for chunk in iter(lambda: f.read(1 << 20), b""):
      digest.update(chunk)
  return digest.hexdigest()


def batches(
  examples: Sequence[Example], batch_size: int, patch: int, seed: int, start_step: int = 0
) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
  """Training batches: (image [b, p, p, C], probabilities [b, p, p, K], labels [b, p, p]).

  Every batch comes from draws of one (channels, classes) shape, so each step compiles
  once per shape; the draws, slices, corners, flips and quarter turns are drawn from
  (seed, step), so batch n is the same whether or not the run was resumed before it.
  """
  groups: dict[tuple[int, int], list[int]] = {}
  for i, e in enumerate(examples):
    groups.setdefault((e.image.shape[-1], e.probabilities.shape[-1]), []).append(i)
  keys = sorted(groups)
  weights = np.array([len(groups[k]) for k in keys], np.float64)
  step = start_step
  while True:
    rng = np.random.default_rng([seed, step])
    members = groups[keys[rng.choice(len(keys), p=weights / weights.sum())]]
    image, probs, labels = [], [], []
    for i in rng.choice(members, batch_size):
      e = examples[i]
      z = rng.integers(e.labels.shape[0])
      y0 = rng.integers(e.labels.shape[1] - patch + 1)
      x0 = rng.integers(e.labels.shape[2] - patch + 1)
      window = (z, slice(y0, y0 + patch), slice(x0, x0 + patch))
      parts = [e.image[window], e.probabilities[window], e.labels[window]]
      turns, flip = rng.integers(4), rng.integers(2)
      parts = [np.rot90(p, turns, axes=(0, 1)) for p in parts]
      if flip:
        parts = [p[:, ::-1] for p in parts]
      for out, p in zip((image, probs, labels), parts, strict=True):
        out.append(np.ascontiguousarray(p))
    yield (
      np.stack(image).astype(np.float32),
      np.stack(probs).astype(np.float32) / 255,
      np.stack(labels),
    )
    step += 1


def mean_iou(pred: np.ndarray, truth: np.ndarray, num_classes: int) -> float:
  """Mean IoU over the classes present in truth or prediction (`losses.iou_from_confusion`)."""
  from fibseg_jax.train import losses  # noqa: PLC0415 - JAX; pool workers never score

  index = truth.astype(np.int64).ravel() * num_classes + pred.astype(np.int64).ravel()
  confusion = np.bincount(index, minlength=num_classes**2).reshape(num_classes, num_classes)
  return losses.iou_from_confusion(confusion)[1]


def elapsed(start: float) -> float:
  return round(time.perf_counter() - start, 1)


# --- the enhancer's training ------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class PretrainConfig:
  """What `fibseg pretrain` does.

  Attributes:
    draws: training draws in the pool (seeds 0..draws-1).
    held_out: held-out draws (seeds from `HELD_OUT_SEED`), scored, never trained on.
    shape: (z, y, x) of each draw.
    steps: training steps in all (a resumed run stops at the same step).
    batch_size: patches per step.
    patch: y-x side of a patch (a multiple of 2**depth).
    learning_rate: peak of a warm-up + cosine schedule.
    warmup_steps: linear warm-up.
    seed: initial weights and batches.
    save_every: a checkpoint every this many steps.
    workers: processes making the pool.
    features: enhancer widths, one per level.
    num_classes: classes of every draw (2-6); None draws them (the shipped prior).
    num_channels: detectors of every draw (1-3); None draws them (the shipped prior).
  """

  draws: int = 220
  held_out: int = 40
  shape: tuple[int, int, int] = (4, 256, 256)
  steps: int = 2500
  batch_size: int = 8
  patch: int = 96
  learning_rate: float = 1e-3
  warmup_steps: int = 100
  seed: int = 0
  save_every: int = 250
  workers: int = 2
  features: tuple[int, ...] = (8, 16, 32, 64)
  num_classes: int | None = None
  num_channels: int | None = None

  def __post_init__(self):
    for name in ("draws", "steps", "batch_size", "patch", "save_every", "workers"):
      if int(getattr(self, name)) < 1:
        raise ValueError(f"--{name}={getattr(self, name)}: expected an integer >= 1")
    if self.held_out < 0 or self.warmup_steps < 0:
      raise ValueError("--held_out and --warmup_steps must be >= 0")
    if self.patch > min(self.shape[1:]) or self.patch % 2 ** (len(self.features) - 1):
      raise ValueError(
        f"--patch={self.patch}: expected a multiple of {2 ** (len(self.features) - 1)} "
        f"no larger than the draws' y and x {list(self.shape[1:])}"
      )
    if not self.learning_rate > 0:
      raise ValueError(f"--learning_rate={self.learning_rate}: expected a number > 0")

  def to_json(self) -> dict[str, Any]:
    fields = dataclasses.asdict(self)
    for name in ("num_classes", "num_channels"):  # drawn: the shipped prior's record
      if fields[name] is None:
        del fields[name]
    return {k: list(v) if isinstance(v, tuple) else v for k, v in fields.items()}


def model_config(config: PretrainConfig):
  from fibseg_jax.models import enhancer  # noqa: PLC0415

  return enhancer.EnhancerConfig(depth=len(config.features) - 1, features=config.features)


def _loss_fn(logits, labels):
  """Class-balanced softmax cross-entropy plus soft Dice over the classes of the batch."""
  import jax  # noqa: PLC0415
  import jax.numpy as jnp  # noqa: PLC0415
  import optax  # noqa: PLC0415

  k = logits.shape[-1]
  onehot = jax.nn.one_hot(labels, k)
  freq = onehot.mean(axis=(0, 1, 2))
  weight = jnp.where(freq > 0, 1 / jnp.sqrt(jnp.maximum(freq, 1e-6)), 0.0)
  weight = weight / jnp.sum(weight * freq)
  ce = optax.softmax_cross_entropy(logits, onehot)
  ce = jnp.mean(ce * jnp.sum(onehot * weight, axis=-1))
  p = jax.nn.softmax(logits)
  inter = jnp.sum(p * onehot, axis=(0, 1, 2))
  denom = jnp.sum(p + onehot, axis=(0, 1, 2))
  present = freq > 0
  dice = 1 - jnp.sum(jnp.where(present, 2 * inter / (denom + 1e-6), 0)) / jnp.maximum(
    present.sum(), 1
  )
  return ce + dice


class Trainer:
  """The enhancer's parameters, optimizer and jitted steps (one compile per shape)."""

  def __init__(self, config: PretrainConfig):
    import jax  # noqa: PLC0415
    import jax.numpy as jnp  # noqa: PLC0415
    import optax  # noqa: PLC0415

    from fibseg_jax.models import enhancer  # noqa: PLC0415

    self.config = config
    self.model = enhancer.Enhancer(model_config(config))
    p = config.patch
    variables = self.model.init(
      jax.random.key(config.seed), jnp.zeros((1, p, p, 1)), jnp.zeros((1, p, p, 2))
    )
    schedule = optax.warmup_cosine_decay_schedule(
      0.0,
      config.learning_rate,
      min(config.warmup_steps, config.steps - 1),
      config.steps,
      config.learning_rate / 100,
    )
    self.tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(schedule, weight_decay=1e-4))
    self.state = {
      "params": variables["params"],
      "batch_stats": variables["batch_stats"],
      "opt_state": self.tx.init(variables["params"]),
      "step": jnp.zeros((), jnp.int32),
    }
    model, tx = self.model, self.tx

    def train_step(state, image, probs, labels):
      def loss(params):
        logits, updates = model.apply(
          {"params": params, "batch_stats": state["batch_stats"]},
          image,
          probs,
          train=True,
          mutable=["batch_stats"],
        )
        return _loss_fn(logits, labels), updates

      (value, updates), grads = jax.value_and_grad(loss, has_aux=True)(state["params"])
      change, opt_state = tx.update(grads, state["opt_state"], state["params"])
      return {
        "params": optax.apply_updates(state["params"], change),
        "batch_stats": updates["batch_stats"],
        "opt_state": opt_state,
        "step": state["step"] + 1,
      }, value

    def predict(state, image, probs):
      variables = {"params": state["params"], "batch_stats": state["batch_stats"]}
      return jax.nn.softmax(model.apply(variables, image, probs, train=False))

    self.train_step = jax.jit(train_step, donate_argnums=(0,))
    self.predict = jax.jit(predict)

  @property
  def step(self) -> int:
    return int(self.state["step"])

  def variables(self) -> dict[str, Any]:
    return {"params": self.state["params"], "batch_stats": self.state["batch_stats"]}


def _manager(workdir: str):
  import orbax.checkpoint as ocp  # noqa: PLC0415

  options = ocp.CheckpointManagerOptions(max_to_keep=2, create=True)
  return ocp.CheckpointManager(
    os.path.abspath(os.path.join(workdir, "checkpoints")), options=options
  )


def score(trainer: Trainer, examples: Sequence[Example]) -> dict[str, float]:
  """Held-out mean IoU of the forest and of the enhancer on the draws' unpainted slices."""
  forest, enhanced = [], []
  m = 2 ** (len(trainer.config.features) - 1)
  for e in examples:
    for z in range(e.labels.shape[0]):
      if (e.painted[z] != annotations.IGNORE_LABEL).any():
        continue
      y, x = (e.labels.shape[1] // m) * m, (e.labels.shape[2] // m) * m
      probs = e.probabilities[z, :y, :x].astype(np.float32) / 255
      image = e.image[z, :y, :x].astype(np.float32)
      truth = e.labels[z, :y, :x]
      k = probs.shape[-1]
      out = np.asarray(trainer.predict(trainer.state, image[None], probs[None]))[0]
      forest.append(mean_iou(probs.argmax(-1), truth, k))
      enhanced.append(mean_iou(out.argmax(-1), truth, k))
  return {
    "forest_miou": round(float(np.mean(forest)), 4),
    "enhancer_miou": round(float(np.mean(enhanced)), 4),
    "slices": len(forest),
  }


def train(
  config: PretrainConfig,
  workdir: str,
  *,
  progress: bool = True,
  log=print,
  stop_at: int | None = None,
) -> dict[str, Any]:
  """Builds (or finishes) the pool, then trains (or resumes) the enhancer.

  Args:
    config: what to do.
    workdir: the pool and the checkpoints; a rerun resumes them.
    progress: progress bars with ETA.
    log: where progress lines go.
    stop_at: stop (with a checkpoint) at this step, to go on in a later run; Ctrl-C
      does the same at the current step.

  Returns:
    {"trainer", "step", "pool_seconds", "train_seconds", "held_out": score(...)}.

  Raises:
    ValueError: a workdir holding a run with other settings.
    KeyboardInterrupt: Ctrl-C, after saving a checkpoint.
  """
  import orbax.checkpoint as ocp  # noqa: PLC0415
  from tqdm import tqdm  # noqa: PLC0415

  os.makedirs(workdir, exist_ok=True)
  record = os.path.join(workdir, "pretrain.json")
  mine = {"generator_version": GENERATOR_VERSION, "config": config.to_json()}
  if os.path.isfile(record):
    with open(record) as f:
      theirs = json.load(f)
    if theirs != mine:
      raise ValueError(
        f"--workdir={workdir} holds a pretraining run with other settings ({theirs}); "
        "use a new --workdir or the same flags"
      )
  else:
    with open(record, "w") as f:
      json.dump(mine, f, indent=1)
  train_seeds, held_seeds = pool_seeds(config.draws, config.held_out)
  start = time.perf_counter()
  paths = build_pool(
    workdir,
    held_seeds + train_seeds,
    shape=config.shape,
    num_classes=config.num_classes,
    num_channels=config.num_channels,
    workers=config.workers,
    progress=progress,
  )
  pool_seconds = elapsed(start)
  held = [load_example(p) for p in paths[: len(held_seeds)]]
  examples = [load_example(p) for p in paths[len(held_seeds) :]]
  trainer = Trainer(config)
  mngr = _manager(workdir)
  if mngr.latest_step() is not None:
    trainer.state = mngr.restore(mngr.latest_step(), args=ocp.args.StandardRestore(trainer.state))
    log(f"pretrain: resumed at step {trainer.step} from {workdir}/checkpoints")
  start = time.perf_counter()
  it = batches(examples, config.batch_size, config.patch, config.seed, trainer.step)
  losses = []
  last = config.steps if stop_at is None else min(stop_at, config.steps)
  with tqdm(
    total=config.steps, initial=trainer.step, desc="pretrain", unit="step", disable=not progress
  ) as bar:
    try:
      while trainer.step < last:
        image, probs, labels = next(it)
        trainer.state, loss = trainer.train_step(trainer.state, image, probs, labels)
        losses.append(float(loss))
        bar.update(1)
        if trainer.step % 20 == 0:
          bar.set_postfix(loss=f"{np.mean(losses[-20:]):.3f}")
        if trainer.step % config.save_every == 0 or trainer.step == last:
          mngr.save(trainer.step, args=ocp.args.StandardSave(trainer.state))
          mngr.wait_until_finished()
          if held and trainer.step % (4 * config.save_every) == 0:
            log(f"pretrain: step {trainer.step}: held-out {score(trainer, held)}")
    except KeyboardInterrupt:
      if mngr.latest_step() != trainer.step:
        mngr.save(trainer.step, args=ocp.args.StandardSave(trainer.state), force=True)
        mngr.wait_until_finished()
      mngr.close()
      raise KeyboardInterrupt(
        f"stopped at step {trainer.step}: checkpoint saved in {workdir}/checkpoints; "
        "run the same command to go on"
      ) from None
  mngr.close()
  result = {
    "step": trainer.step,
    "pool_seconds": pool_seconds,
    "train_seconds": elapsed(start),
    "held_out": score(trainer, held) if held and trainer.step == config.steps else {},
  }
  return {"trainer": trainer, **result}


def export(trainer: Trainer, directory: str, provenance: dict[str, Any]) -> str:
  """Writes `prior.msgpack` (inference weights) and `prior.json` (provenance + sha256)."""
  import flax.serialization  # noqa: PLC0415
  import jax  # noqa: PLC0415

  os.makedirs(directory, exist_ok=True)
  weights = os.path.join(directory, "prior.msgpack")
  variables = jax.tree_util.tree_map(np.asarray, trainer.variables())
  with open(f"{weights}.partial", "wb") as f:
    f.write(flax.serialization.to_bytes(variables))
  os.replace(f"{weights}.partial", weights)
  info = {
    "model": dataclasses.asdict(model_config(trainer.config)),
    "generator_version": GENERATOR_VERSION,
    "pretrain": trainer.config.to_json(),
    **provenance,
    "sha256": sha256(weights),
  }
  with open(os.path.join(directory, "prior.json"), "w") as f:
    json.dump(info, f, indent=1)
  return weights
