"""What every study shares: `StudyContext` (where, on what stack, how long, with which
seeds and config overrides) and the numbers a study reports (seed statistics, paired
differences, their text, markdown tables).

A study is a module of this package with `USAGE` (its help), `OPTIONS` (its own flags)
and `run(ctx, **options)`; `fibseg study NAME` builds the context from the shared flags
(`fibseg_jax.cli.study`) and calls it. The cells of a study are cached in
`ctx.out/<row>_s<seed>/result.json` with the settings they were computed with
(`runs.cached`), so a rerun resumes and never retrains a finished cell.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from fibseg_jax.data import volume as volume_lib
from fibseg_jax.study import budget as budget_lib

# The seeds of a study that trains on one stack with seeds, when --seeds is not given.
DEFAULT_SEEDS = (0, 1, 2)


@dataclasses.dataclass(frozen=True)
class Option:
  """One flag of a study of its own (beyond the shared ones of `StudyContext`).

  Attributes:
    name: the flag (--name) and the keyword of the study's `run`.
    kind: "string", "bool", "integer", "float", "list" or "multi_string" (absl's DEFINE_*).
    default: its default.
    help: one line.
  """

  name: str
  kind: str
  default: Any
  help: str


@dataclasses.dataclass(frozen=True)
class OneStack:
  """The stack a study on one stack trains and scores on, and its seeds.

  Attributes:
    volume: the volume's path.
    channels: input channels.
    slices: slab depth of the U-Net.
    seeds: training seeds.
    train_slices: annotated slices trained on.
    eval_slices: annotated slices scored, never trained on.
  """

  volume: str
  channels: Sequence[str]
  slices: int
  seeds: Sequence[int]
  train_slices: Sequence[int]
  eval_slices: Sequence[int]

  def describe(self, classes: Sequence[str], budget: budget_lib.Budget) -> dict[str, Any]:
    """The head of a study's table on this stack: what it trained and scored on, how."""
    return {
      "volume": self.volume,
      "classes": list(classes),
      "channels": list(self.channels),
      "slices": int(self.slices),
      "train_slices": [int(z) for z in self.train_slices],
      "eval_slices": [int(z) for z in self.eval_slices],
      "seeds": [int(s) for s in self.seeds],
      "budget": budget.to_json(),
    }


@dataclasses.dataclass(frozen=True)
class StudyContext:
  """Where and on what a study runs; the same for each of its cells.

  Attributes:
    out: the study's folder (claimed by the study; resumed if it is its own).
    budget: steps, widths, patches, tiling; its `overrides` (--config.FIELD=VALUE) reach
      the config of every network cell (`runs.network_config`).
    volume: the stack, or None for the budget's synthetic stack generated in `out`.
    channels: input channels, or None for all of the volume's.
    slices: slab depth of the U-Net.
    seeds: training seeds, or None for the study's default.
    train_slices: annotated slices trained on, or None for the budget's.
    eval_slices: annotated slices scored, or None for the budget's.
    rows: only the rows matching these names (or fnmatch patterns), or None for all.
    log: receives one progress line per cell.
    stack_name: the name of the stack in a suite (`suite.run_suite`), else None.
  """

  out: str
  budget: budget_lib.Budget
  volume: str | None = None
  channels: tuple[str, ...] | None = None
  slices: int = 3
  seeds: tuple[int, ...] | None = None
  train_slices: tuple[int, ...] | None = None
  eval_slices: tuple[int, ...] | None = None
  rows: tuple[str, ...] | None = None
  log: Callable[[str], None] = print
  stack_name: str | None = None

  def stack(self, annotate: Sequence[int] | None = None, **severities: float) -> OneStack:
    """The stack of a study on one stack: the context's, with the defaults filled in.

    Without a volume the budget's synthetic stack is generated in `out`/volume.zarr
    (labelled on `annotate`, default the budget's slices; `severities` as
    `synth.SynthConfig`'s, e.g. drift=1).
    """
    from fibseg_jax.study import comparison  # the synthetic stack's generator

    volume = self.volume
    if not volume:
      volume = os.path.join(self.out, "volume.zarr")
      extra = {} if annotate is None else {"annotate": annotate}
      comparison.synthetic_volume(volume, self.budget, **extra, **severities)
    vol = volume_lib.open_volume(volume)
    return OneStack(
      volume=volume,
      channels=tuple(self.channels or vol.channels),
      slices=self.slices,
      seeds=tuple(self.seeds or DEFAULT_SEEDS),
      train_slices=tuple(self.train_slices or self.budget.train_slices),
      eval_slices=tuple(self.eval_slices or self.budget.eval_slices),
    )

  def write_text(self, name: str, text: str) -> str:
    """Writes `text` to `out`/`name` (a table) and returns the path."""
    path = os.path.join(self.out, name)
    with open(path, "w") as f:
      f.write(text)
    return path


def seed_stats(values: Sequence[float | None]) -> dict[str, float | None]:
  """Mean and sample standard deviation (None with one value) over seeds; Nones left out."""
  v = np.asarray([x for x in values if x is not None], np.float64)
  if not v.size:
    return {"mean": None, "std": None}
  return {"mean": float(v.mean()), "std": float(v.std(ddof=1)) if v.size > 1 else None}


def paired_differences(
  results: Sequence[Mapping[str, Any]],
  reference: Sequence[Mapping[str, Any]],
  key: str = "mean_iou",
) -> list[float]:
  """`key` of each result minus that of the reference's result of the same seed (the
  same split and first batches), for the seeds both have and a value in `results`."""
  by_seed = {r["seed"]: r for r in reference if "seed" in r}
  return [
    r[key] - by_seed[r["seed"]][key]
    for r in results
    if r.get("seed") in by_seed and r[key] is not None
  ]


def stat_text(stats: Mapping[str, Any] | None, digits: int = 3) -> str:
  """ "0.812 +- 0.004" (mean +- std over seeds), "0.812" for one seed, "-" for none."""
  if not stats or stats.get("mean") is None:
    return "-"
  std = stats.get("std")
  return f"{stats['mean']:.{digits}f}" + ("" if std is None else f" +- {std:.{digits}f}")


def stack_text(document: Mapping[str, Any]) -> str:
  """ "3-slice slabs, channels ICE, TLD, train slices [4, 8], scored on [16]": what the
  networks of a table (`OneStack.describe`) read, trained on and were scored on."""
  return (
    f"{document['slices']}-slice slabs, channels {', '.join(document['channels'])}, train "
    f"slices {document['train_slices']}, scored on {document['eval_slices']}"
  )


def steps_text(budget: Mapping[str, Any]) -> str:
  """ "400 steps of 8 x 128^2": the training of a budget (`Budget.to_json`), in a table's
  caption."""
  return f"{budget['steps']} steps of {budget['batch_size']} x {budget['patch']}^2"


def markdown_table(head: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
  """The lines of a markdown table: `head`, its rule, then one line per row of cells."""
  return [
    "| " + " | ".join(head) + " |",
    "| " + " | ".join("---" for _ in head) + " |",
    *("| " + " | ".join(cells) + " |" for cells in rows),
  ]
