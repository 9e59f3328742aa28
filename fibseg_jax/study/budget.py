"""Budgets of the study and the artifact sweep: what is run, how long, on what stack.

A budget fixes everything that sets the cost: the default synthetic stack, the step
budget and widths of the networks, the tiling of inference, the seeds and the sweep's
severity levels. Every network row of a study gets the same step budget.

  quick  2 CPU cores, 60 minutes for the study and 60 for the sweep (see BUILD_NOTES.md
         for the measured step times it was set from; retune it after measuring).
  paper  an accelerator: the networks at their default widths, 3 seeds everywhere.
  smoke  a tiny stack and a few steps, to check the whole pipeline in a minute (tests).

Each is a config file in `fibseg_jax/configs/budgets/` starting from `base.py`;
`get("my_budget.py")` (`--budget=my_budget.py`) reads one of your own.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

from fibseg_jax import configs
from fibseg_jax.baselines import CleaningConfig, ForestConfig
from fibseg_jax.configs import budgets as budget_configs


@dataclasses.dataclass(frozen=True)
class Budget:
  """What a study or sweep run costs.

  Attributes:
    name: "quick", "paper" or "smoke".
    shape: (z, y, x) of the default synthetic stack.
    train_slices: annotated slices trained on (25% of their area held out).
    eval_slices: annotated slices scored on, never trained on.
    steps: training steps of every network.
    batch_size: patches per step.
    patch: y-x side of a training patch.
    val_block: side of the validation blocks.
    eval_every: validation (and checkpoint) every N steps.
    warmup_steps: learning-rate warmup.
    unet_depth, unet_features: U-Net size (features: depth + 1 or depth + 2 widths).
    sensor3d_depth, sensor3d_features: Sensor-3D size.
    workers: loader threads.
    tile, overlap, infer_batch: whole-stack inference tiling.
    seeds: training seeds of every network row.
    spread_seeds: seeds of the rows in `spread_rows` (the multi-slice finding's spread).
    spread_rows: row names that get `spread_seeds`.
    forest: features and forest of the random-forest route.
    cleaning: the cleaning of route (b) and of the cleaned-input network.
    sweep_levels: severities (x the default) of each artifact in the sweep.
    sweep_seeds: seeds of the sweep's network and forest.
    sweep_network: (architecture, slab slices, channels) of the sweep's network when no
      finished study names the best one.
    overrides: ((dotted config field, value), ...): the command line's
      --config.FIELD=VALUE, set in the config of every network cell after the budget's
      settings (`runs.network_config`); part of every cached cell's settings.
  """

  name: str
  shape: tuple[int, int, int]
  train_slices: tuple[int, ...]
  eval_slices: tuple[int, ...]
  steps: int
  batch_size: int
  patch: int
  val_block: int
  eval_every: int
  warmup_steps: int
  unet_depth: int
  unet_features: tuple[int, ...]
  sensor3d_depth: int
  sensor3d_features: tuple[int, ...]
  workers: int
  tile: int
  overlap: int
  infer_batch: int
  seeds: tuple[int, ...]
  spread_seeds: tuple[int, ...]
  spread_rows: tuple[str, ...]
  forest: ForestConfig
  cleaning: CleaningConfig
  sweep_levels: tuple[float, ...]
  sweep_seeds: tuple[int, ...]
  sweep_network: tuple[str, int, tuple[str, ...]] = ("unet", 3, ("ICE", "TLD"))
  overrides: tuple[tuple[str, Any], ...] = ()

  def model(self, architecture: str) -> dict[str, Any]:
    """Model-config overrides of an architecture ("unet" or "sensor3d")."""
    if architecture == "unet":
      return {"depth": self.unet_depth, "features": tuple(self.unet_features)}
    if architecture == "sensor3d":
      return {"depth": self.sensor3d_depth, "features": tuple(self.sensor3d_features)}
    raise ValueError(f"no network architecture {architecture!r}; expected unet or sensor3d")

  def to_json(self) -> dict[str, Any]:
    out = dataclasses.asdict(self)
    out["forest"] = self.forest.to_json()
    out["cleaning"] = self.cleaning.to_json()
    # Without overrides a budget reads as it did before they existed: the cached cells
    # and tables of earlier studies stay valid.
    overrides = out.pop("overrides")
    if overrides:
      out["overrides"] = {name: value for name, value in overrides}
    return _lists(out)


def _lists(value: Any) -> Any:
  """Tuples to lists, recursively, so a budget compares equal to its JSON round trip."""
  if isinstance(value, dict):
    return {k: _lists(v) for k, v in value.items()}
  if isinstance(value, list | tuple):
    return [_lists(v) for v in value]
  return value


def from_config(config: Any) -> Budget:
  """The typed budget of a budget config (`fibseg_jax/configs/budgets/*.py`)."""
  c = config.to_dict() if hasattr(config, "to_dict") else dict(config)
  known = {f.name for f in dataclasses.fields(Budget)}
  unknown = sorted(set(c) - known)
  if unknown:
    raise ValueError(f"budget {c.get('name')!r}: unknown field(s) {unknown}")
  values = {k: _tuples(v) for k, v in c.items() if k not in ("forest", "cleaning")}
  architecture, slices, channels = values.get("sweep_network", ("unet", 3, ("ICE", "TLD")))
  values["sweep_network"] = (str(architecture), int(slices), tuple(channels))
  return Budget(
    **values,
    forest=ForestConfig(**dict(c.get("forest") or {})),
    cleaning=CleaningConfig(**dict(c.get("cleaning") or {})),
  )


def _tuples(value: Any) -> Any:
  if isinstance(value, list | tuple):
    return tuple(_tuples(v) for v in value)
  return value


def _load(path: str) -> Budget:
  try:
    return from_config(configs.load(path))
  except ValueError as e:
    raise ValueError(f"--budget={path}: {e}") from None


def _shipped() -> dict[str, Budget]:
  directory = budget_configs.DIRECTORY
  names = configs.names(directory, exclude=("base",))
  return {n: _load(os.path.join(directory, f"{n}.py")) for n in names}


BUDGETS = _shipped()
# The help of the subcommands' --budget flag.
FLAG_HELP = (
  f"Budget of the runs: {', '.join(BUDGETS)} (fibseg_jax/configs/budgets/) or a budget "
  "file of your own with a get_config()."
)
QUICK, PAPER, SMOKE = BUDGETS["quick"], BUDGETS["paper"], BUDGETS["smoke"]


def get(name: str) -> Budget:
  """The budget called `name` (a shipped one) or in the file `name`; errors name --budget."""
  if name in BUDGETS:
    return BUDGETS[name]
  if name.endswith(".py") and os.path.isfile(name):
    return _load(name)
  raise ValueError(
    f"--budget={name}: expected one of {', '.join(BUDGETS)} or a budget file with a "
    "get_config() (see fibseg_jax/configs/budgets/)"
  )
