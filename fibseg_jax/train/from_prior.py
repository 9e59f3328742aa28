"""A U-Net run that starts from the prior: `--config.train.init_from=prior`.

The shipped prior (`fibseg_jax/prior/`, made by `fibseg pretrain`) is an enhancer
(`fibseg_jax.models.enhancer`) whose inner network is a U-Net backbone. A run started
from it takes that backbone whole:

* **config** (`adopt_backbone`, called by `loop.prepare`): the run's model fields
  `BACKBONE` (widths, depth, norm, activation, upsampling, conv bias) are set to the
  prior's, from its prior.json. A field the user set to anything but the U-Net's default
  or the prior's value is a ConfigError naming the flag and the value expected.
* **weights** (`init_state`, called by `loop._init_from`): every backbone kernel, bias,
  batch-norm scale/bias and batch-norm running statistic whose path and shape match is
  copied from the enhancer (`down{l}`, `up{l}`); the head is fresh for the run's class
  count (as are deep-supervision heads); the first convolution is fitted (below).

**The first convolution.** The enhancer does not take the image with its first conv: a
shared per-detector stem (3x3, 8 features) sees each detector's signal, its outputs
are averaged and max-pooled over detectors, concatenated with the class evidence and
only then go through `down0/conv0`. The U-Net's `down0/conv0` instead sees the slab's
slices x channels directly. Its kernel `[3, 3, slices * channels, features[0]]` and bias
are fitted by ridge-regularised least squares so that, on slabs drawn from the prior's
own generator (`fibseg_jax.data.randomised`, the distribution it learned from, with its
real z-correlation), the U-Net's first conv reproduces the enhancer's `down0/conv0`
pre-norm outputs on the central slice under uninformative class evidence (uniform
probabilities). So the rest of the copied backbone, batch-norm statistics included,
receives activations of the scale and meaning it was trained on (the fit keeps the
activation variance by construction, less what no 3x3 linear map can reproduce: the fit
reports R^2). Neighbouring slices get the weight the data gives them (the enhancer sees
the central slice only, so mostly little), and training moves them from there. This
works for any channel count and slab depth; the fit is deterministic (fixed draws), so
the seed of a run changes only its fresh head.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from fibseg_jax import models
from fibseg_jax.data import randomised
from fibseg_jax.models import enhancer
from fibseg_jax.train import config as config_lib
from fibseg_jax.train import pretrain
from fibseg_jax.train.config import ConfigError

SHIPPED = "prior"  # --config.train.init_from=prior names the prior shipped in the package
PRIOR_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "prior")
WEIGHTS = "prior.msgpack"
PROVENANCE = "prior.json"
FLAG = "--config.train.init_from"
# The model fields a run takes from the prior (its backbone's architecture).
BACKBONE = ("depth", "features", "norm", "activation", "negative_slope", "upsample", "conv_bias")
# The first conv's fit: generated slabs of this y-x side, this many, and the ridge
# penalty relative to the mean diagonal of the normal equations.
FIT_SIDE = 64
FIT_DRAWS = 8
FIT_RIDGE = 1e-3
FIRST_CONV = ("down0", "conv0")


class PriorError(ValueError):
  """The prior's files are missing, altered or of another version."""


@dataclasses.dataclass(frozen=True)
class Source:
  """Where the weights came from, as `loop.fine_tune_line` prints it."""

  path: str
  step: int | None = None


def prior_directory(init_from: str) -> str | None:
  """The prior folder `init_from` names, or None when it names a training run.

  `prior` is the shipped prior; a folder holding prior.msgpack and prior.json (an
  export of `fibseg pretrain`) is that prior. Anything else is left to the fine-tuning
  of a training run (`loop._init_from`).
  """
  init_from = str(init_from or "")
  if init_from == SHIPPED:
    return PRIOR_DIR
  if init_from and all(os.path.isfile(os.path.join(init_from, f)) for f in (WEIGHTS, PROVENANCE)):
    return init_from
  return None


def read_provenance(directory: str) -> dict[str, Any]:
  """prior.json of the prior in `directory`.

  Raises:
    PriorError: no prior there.
  """
  weights, record = os.path.join(directory, WEIGHTS), os.path.join(directory, PROVENANCE)
  if not os.path.isfile(weights) or not os.path.isfile(record):
    raise PriorError(
      f"no prior in {directory} (expected {WEIGHTS} and {PROVENANCE}; `fibseg pretrain` makes them)"
    )
  with open(record) as f:
    return json.load(f)


def read_prior(directory: str = PRIOR_DIR) -> tuple[enhancer.Enhancer, Any, dict[str, Any]]:
  """The prior in `directory`: (its enhancer, its variables, its provenance record).

  Raises:
    PriorError: a missing file, or weights whose sha256 differs from prior.json's.
  """
  provenance = read_provenance(directory)
  weights, record = os.path.join(directory, WEIGHTS), os.path.join(directory, PROVENANCE)
  digest = pretrain.sha256(weights)
  if digest != provenance.get("sha256"):
    raise PriorError(
      f"{weights}: sha256 {digest} differs from the {provenance.get('sha256')} that "
      f"{record} records; the weights were altered or belong to another prior"
    )
  fields = dict(provenance["model"])
  fields["features"] = tuple(fields["features"])
  model = enhancer.Enhancer(enhancer.EnhancerConfig(**fields))
  m = 2 ** fields["depth"]
  # The shapes only: an eager init compiles every op (tens of seconds on a loaded CPU).
  template = jax.eval_shape(
    model.init, jax.random.key(0), jnp.zeros((1, m, m, 1)), jnp.zeros((1, m, m, 2))
  )
  with open(weights, "rb") as f:
    variables = flax.serialization.from_bytes(template, f.read())
  return model, jax.tree.map(jnp.asarray, variables), provenance


def _plain(value: Any) -> Any:
  """Lists and tuples compare equal (a config from the command line holds either)."""
  return json.loads(json.dumps(value))


def adopt_backbone(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Sets the model's backbone fields to the prior's when train.init_from names a prior.

  A field counts as unset when it is absent or at the U-Net's default; a field set to
  something else must equal the prior's.

  Args:
    config: the experiment config (changed in place).

  Returns:
    `config`, unchanged unless train.init_from names a prior.

  Raises:
    ConfigError: one line naming the flag and the expected value (another model, a
      conflicting backbone field, no prior at the path).
  """
  init_from = str(config.train.get("init_from") or "")
  directory = prior_directory(init_from)
  if directory is None:
    return config
  name = config.model.get("name")
  if name != "unet":
    raise ConfigError(
      f"--config.model.name={name}: {FLAG}={init_from} initialises the U-Net only (--config=unet)"
    )
  try:
    theirs = read_provenance(directory)["model"]
  except (PriorError, KeyError, ValueError) as e:
    raise ConfigError(f"{FLAG}={init_from}: {e}") from None
  defaults = models.default_config("unet")
  for field in BACKBONE:
    expected = _plain(theirs[field])
    if field in config.model:
      mine = _plain(config.model[field])
      if mine not in (expected, _plain(defaults[field])):
        shown = tuple(expected) if isinstance(expected, list) else expected
        raise ConfigError(
          f"--config.model.{field}={config.model[field]}: {FLAG}={init_from} takes the "
          f"prior's backbone, so expected {shown} (or leave it unset)"
        )
    value = tuple(expected) if isinstance(expected, list) else expected
    with config.unlocked():
      config.model[field] = value
  return config


def backbone_line(model: Any, directory: str) -> str:
  """The one line saying which model fields (of the model's config) came from the prior."""
  fields = " ".join(f"model.{f}={getattr(model, f)}" for f in BACKBONE)
  return f"{FLAG}: the U-Net takes the prior's backbone ({fields}, from {directory}/{PROVENANCE})"


def _normalised(image: np.ndarray) -> np.ndarray:
  """Per-channel (x - mid) * 2 / spread over the 0.5 and 99.5 percentiles, as the
  loader and the forest route normalise. `image`: [..., channels]."""
  pixels = image.reshape(-1, image.shape[-1]).astype(np.float32)
  lo, hi = np.percentile(pixels, (0.5, 99.5), axis=0)
  spread = np.where(hi - lo > 1e-6 * np.maximum(1.0, np.abs(hi)), hi - lo, 2.0)
  return ((image - (lo + hi) / 2) * (2.0 / spread)).astype(np.float32)


def _patches(slab: np.ndarray) -> np.ndarray:
  """3x3 neighbourhoods of `slab: [n, y, x, features]` with zero padding, as a flax 3x3
  "SAME" conv reads them: [n, y, x, 3 * 3 * features], ordered (dy, dx, feature)."""
  _, y, x, _ = slab.shape
  padded = np.pad(slab, ((0, 0), (1, 1), (1, 1), (0, 0)))
  shifts = [padded[:, i : i + y, j : j + x] for i in range(3) for j in range(3)]
  return np.stack(shifts, axis=3).reshape(*slab.shape[:3], -1)


class _Reached(Exception):  # noqa: N818 - control flow, not an error
  """Carries the first conv's outputs out of the enhancer's forward pass."""

  def __init__(self, outputs):
    super().__init__()
    self.outputs = outputs


def _first_conv_outputs(model, variables, image: np.ndarray, probabilities: np.ndarray):
  """The enhancer's `down0/conv0` outputs `[batch * classes, y, x, features[0]]`.

  The forward pass stops there: the rest of the network is never traced, and the few
  dozen ops up to it compile as one program.
  """

  def stop_after_first_conv(call, args, kwargs, context):
    out = call(*args, **kwargs)
    if context.module.path == FIRST_CONV and context.method_name == "__call__":
      raise _Reached(out)
    return out

  def first_conv(variables, image, probabilities):
    try:
      with flax.linen.intercept_methods(stop_after_first_conv):
        model.apply(variables, image, probabilities, train=False)
    except _Reached as reached:
      return reached.outputs  # a value of this same trace
    raise AssertionError("the enhancer has no down0/conv0")  # models/enhancer.py names it

  return jax.jit(first_conv)(variables, image, probabilities)


def fit_first_conv(
  model: enhancer.Enhancer, variables: Any, channels: int, slices: int, num_classes: int
) -> tuple[np.ndarray, np.ndarray, float]:
  """The U-Net's first conv fitted to the enhancer's stem, detector pooling and first conv.

  Args:
    model: the prior's enhancer.
    variables: its variables.
    channels: detector channels of the run (1-3).
    slices: its slab depth (odd).
    num_classes: its class count (sets the uniform, uninformative class evidence).

  Returns:
    (kernel `[3, 3, slices * channels, features[0]]`, bias `[features[0]]`, R^2 of the
    fit over the generated pixels).
  """
  slabs = []
  for seed in range(FIT_DRAWS):
    stack = randomised.draw(seed, (slices, FIT_SIDE, FIT_SIDE), num_channels=channels)
    slabs.append(_normalised(stack.image))
  slab = np.stack(slabs)  # [n, slices, y, x, channels]
  centre = slab[:, slices // 2]
  uniform = np.full((*centre.shape[:3], num_classes), 1.0 / num_classes, np.float32)
  target = np.asarray(_first_conv_outputs(model, variables, centre, uniform), np.float64)
  n, y, x = centre.shape[:3]
  target = target.reshape(n, num_classes, y, x, -1)[:, 0]  # the classes see the same image
  # The slab as the U-Net folds it: feature s * channels + c (models/unet.py).
  folded = np.transpose(slab, (0, 2, 3, 1, 4)).reshape(n, y, x, slices * channels)
  inputs = _patches(folded)
  # Rows away from the border, where two stacked convs and one differ only by padding.
  inputs = inputs[:, 2:-2, 2:-2].reshape(-1, inputs.shape[-1]).astype(np.float64)
  target = target[:, 2:-2, 2:-2].reshape(-1, target.shape[-1])
  design = np.concatenate([inputs, np.ones((len(inputs), 1))], axis=1)
  gram = design.T @ design
  ridge = FIT_RIDGE * np.trace(gram[:-1, :-1]) / (gram.shape[0] - 1)
  gram[np.arange(len(gram) - 1), np.arange(len(gram) - 1)] += ridge  # not the intercept
  solution = np.linalg.solve(gram, design.T @ target)
  residual = target - design @ solution
  r2 = 1.0 - float((residual**2).sum() / ((target - target.mean(0)) ** 2).sum())
  kernel = solution[:-1].reshape(3, 3, slices * channels, -1).astype(np.float32)
  return kernel, solution[-1].astype(np.float32), r2


def _flat(tree: Any) -> dict[tuple[str, ...], Any]:
  return flax.traverse_util.flatten_dict(flax.core.unfreeze(tree)) if tree else {}


def map_variables(
  prior_variables: Any,
  params: Any,
  batch_stats: Any,
  first_conv: tuple[np.ndarray, np.ndarray],
) -> tuple[dict[str, Any], dict[str, Any], dict[str, list[str]]]:
  """The U-Net's variables with the prior's backbone in them.

  Args:
    prior_variables: the enhancer's {'params', 'batch_stats'}.
    params: the freshly initialised U-Net's params (deep-supervision heads included).
    batch_stats: its batch statistics ({} without batch norm).
    first_conv: (kernel, bias) of `down0/conv0` (`fit_first_conv`).

  Returns:
    (params, batch_stats, {"prior": [...], "fitted": [...], "fresh": [...]}: the
    parameter paths of each origin, as "down1/conv0/kernel").
  """
  theirs = _flat(prior_variables["params"])
  their_stats = _flat(prior_variables.get("batch_stats", {}))
  origin: dict[str, list[str]] = {"prior": [], "fitted": [], "fresh": []}
  out = {}
  for path, value in _flat(params).items():
    shown = "/".join(path)
    if path[:2] == FIRST_CONV and path[2] in ("kernel", "bias"):
      fitted = first_conv[0] if path[2] == "kernel" else first_conv[1]
      out[path] = jnp.asarray(fitted, value.dtype).reshape(value.shape)
      origin["fitted"].append(shown)
    elif path[0] != "head" and path in theirs and theirs[path].shape == value.shape:
      out[path] = jnp.asarray(theirs[path], value.dtype)
      origin["prior"].append(shown)
    else:
      out[path] = value
      origin["fresh"].append(shown)
  stats = {
    path: jnp.asarray(their_stats[path], v.dtype)
    if path in their_stats and their_stats[path].shape == v.shape
    else v
    for path, v in _flat(batch_stats).items()
  }
  unflat = flax.traverse_util.unflatten_dict
  return unflat(out), (unflat(stats) if stats else {}), origin


def _modules(paths: list[str]) -> str:
  """'down0/conv1/kernel', ... -> 'down0, down1, ...' (their top-level modules, in order)."""
  return ", ".join(dict.fromkeys(p.split("/")[0] for p in paths)) or "none"


def init_state(state, settings: config_lib.Settings, tx, init_from: str, replicated):
  """The fresh state of a U-Net run with the prior's backbone, and what it came from.

  Args:
    state: the freshly initialised `TrainState` (replicated).
    settings: the run's parsed config (`loop.prepare`: its backbone already the prior's).
    tx: the optimizer (a fresh state is made for the new params).
    init_from: train.init_from, naming a prior (`prior_directory`).
    replicated: the sharding of the state.

  Returns:
    (the state, a `Source` for `loop.fine_tune_line`).

  Raises:
    ConfigError: the prior's files are missing or altered.
  """
  directory = prior_directory(init_from)
  try:
    model, variables, _ = read_prior(directory)
  except PriorError as e:
    raise ConfigError(f"{FLAG}={init_from}: {e}") from None
  d, num_classes = settings.data, settings.model.num_classes
  channels = len(d.channels)
  kernel, bias, r2 = fit_first_conv(model, variables, channels, d.slices, num_classes)
  params, batch_stats, origin = map_variables(
    variables, jax.device_get(state.params), jax.device_get(state.batch_stats), (kernel, bias)
  )
  params = jax.device_put(params, replicated)
  batch_stats = jax.device_put(batch_stats, replicated)
  if jax.process_index() == 0:
    print(backbone_line(settings.model, directory))
    print(
      f"{FLAG}: {len(origin['prior'])} arrays from the prior ({_modules(origin['prior'])}, "
      f"batch-norm statistics too); first conv fitted to {int(d.slices)} slice(s) x "
      f"{channels} channel(s) (R^2 {r2:.2f} against the prior's on generated slabs); "
      f"fresh: {_modules(origin['fresh'])} ({num_classes} classes)"
    )
  # Copies: the step donates the state's buffers, and one buffer cannot be donated twice.
  weights = {"params": params, "batch_stats": batch_stats}
  teacher = jax.tree.map(jnp.copy, weights) if state.teacher else {}
  state = state.replace(
    params=params, batch_stats=batch_stats, opt_state=tx.init(params), teacher=teacher
  )
  return state, Source(path=os.path.abspath(directory))
