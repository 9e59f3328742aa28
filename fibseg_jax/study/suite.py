"""A suite of stacks: any study over several stacks, per-stack results and the mean.

  fibseg study ablation --out=suite_ablation/ --stacks=suite --rows=baseline,+lr_3x
  fibseg study ablation --out=two/ --stacks=synthetic,synthetic_drift --budget=smoke

Each stack names its training and evaluation slices. The synthetic ones are generated
by the study itself (labelled on every slice, cached in OUT/stacks/); the real ones
(`STACKS`: ssTEM, SBEM and FIB-SEM) are rebuilt by a script each, never committed, under
--stacks_root (default $FIBSEG_STACKS, else /work/real, where experiments/real_stack.sh
and experiments/stacks/*.sh write). A stack that is not there is skipped with one line
saying how to rebuild it. Each real stack has one signal; a study reads the volume's.

The study runs once per stack into OUT/<stack>/ (each resumable as a single-stack run),
then OUT/suite.json and suite.md hold, per row, each stack's mean IoU and paired
difference (where the study pairs its rows) and their mean and spread over the stacks.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Mapping, Sequence
from types import MappingProxyType
from typing import Any

from fibseg_jax import outputs
from fibseg_jax.study import comparison, runs
from fibseg_jax.study.context import (
  StudyContext,
  markdown_table,
  seed_stats,
  stat_text,
  steps_text,
)

KIND = "study suite"
DEFAULT_ROOT = "/work/real"  # where experiments/real_stack.sh writes its stacks


@dataclasses.dataclass(frozen=True)
class Stack:
  """One stack of the suite.

  Attributes:
    name: its name in --stacks and in the tables.
    severities: a synthetic stack's artifact severities (`synth.SynthConfig`), or None
      for a stack read from `path`.
    path: a real stack's volume, relative to --stacks_root.
    train_slices: annotated slices trained on; None: the budget's (synthetic stacks).
    eval_slices: annotated slices scored; None: the budget's.
    rebuild: the command that rebuilds a real stack (said when it is missing).
  """

  name: str
  severities: Mapping[str, float] | None = None
  path: str | None = None
  train_slices: tuple[int, ...] | None = None
  eval_slices: tuple[int, ...] | None = None
  rebuild: str = ""


def real(
  name: str,
  repo: str,
  train_slices: tuple[int, ...],
  eval_slices: tuple[int, ...],
  script: str | None = None,
) -> Stack:
  """A real stack at STACKS_ROOT/`name`/vol.zarr, rebuilt from a clone of `repo` by
  `script` (default experiments/stacks/`name`.sh)."""
  script = script or f"experiments/stacks/{name}.sh"
  return Stack(
    name,
    path=f"{name}/vol.zarr",
    train_slices=train_slices,
    eval_slices=eval_slices,
    rebuild=f"git clone {repo} SRC && bash {script} SRC STACKS_ROOT/{name}",
  )


_NONE = MappingProxyType({})
STACKS: tuple[Stack, ...] = (
  Stack("synthetic", severities=_NONE),
  Stack(
    "synthetic_harsh",
    severities=MappingProxyType({"curtaining": 2.0, "shading": 2.0, "noise": 2.0}),
  ),
  Stack("synthetic_drift", severities=MappingProxyType({"drift": 1.0})),
  # Serial-section TEM of a Drosophila ventral nerve cord, 20 x 1024^2, 5 classes
  # (CC BY-NC-SA 3.0: rebuilt, never committed).
  real(
    "drosophila_vnc",
    "https://github.com/unidesigner/groundtruth-drosophila-vnc",
    (4, 8, 12),
    (16,),
    script="experiments/real_stack.sh",
  ),
  # Serial block-face SEM (CDeep3M's mitochondria sample), 20 x 1024^2, background and
  # mitochondria (UC Regents: research and non-profit use).
  real("sbem_mito", "https://github.com/CRBS/cdeep3m", (3, 8, 13), (18,)),
  # FIB-SEM of a Drosophila medulla (Janelia FlyEM), 250^3 at 10 nm, cell and membrane
  # (derived from the body segmentation; CC BY 3.0).
  real(
    "flyem_medulla", "https://github.com/janelia-flyem/neuroproof_examples", (50, 100, 150), (200,)
  ),
  # ssTEM of a first-instar larva VNC (ISBI 2012 training set), 30 x 512^2, cell and
  # membrane (non-commercial challenge terms).
  real("isbi2012_vnc", "https://github.com/zhixuhao/unet", (6, 12, 18), (24,)),
)
BY_NAME = {s.name: s for s in STACKS}


def resolve(spec: str) -> list[Stack]:
  """The stacks of --stacks: "suite" (all of them) or a comma list of names.

  Raises:
    ValueError: an unknown name, listing the known ones.
  """
  names = [n.strip() for n in spec.split(",") if n.strip()]
  if names == ["suite"]:
    return list(STACKS)
  unknown = [n for n in names if n not in BY_NAME]
  if unknown or not names:
    raise ValueError(
      f"--stacks={spec}: unknown stack(s) {unknown}; give suite or names of: {', '.join(BY_NAME)}"
    )
  return [BY_NAME[n] for n in dict.fromkeys(names)]


def stacks_root(flag: str | None) -> str:
  """--stacks_root, else $FIBSEG_STACKS, else where experiments/real_stack.sh writes."""
  return flag or os.environ.get("FIBSEG_STACKS") or DEFAULT_ROOT


def prepare(stack: Stack, ctx: StudyContext, root: str) -> str | None:
  """The stack's volume path (a synthetic one generated once), or None if it is missing."""
  if stack.severities is not None:
    path = os.path.join(ctx.out, "stacks", f"{stack.name}.zarr")
    depth = ctx.budget.shape[0]
    comparison.synthetic_volume(path, ctx.budget, annotate=range(depth), **stack.severities)
    return path
  path = os.path.join(root, stack.path)
  if not os.path.exists(path):
    rebuild = stack.rebuild.replace("STACKS_ROOT", root)
    ctx.log(f"skipped {stack.name}: no stack at {path}; rebuild it: {rebuild}")
    return None
  return path


def row_summary(document: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
  """{row name: {"mean_iou", "paired_difference"}} (each mean +- std over seeds, or None)
  of a study's document: the rows any study writes with a name and a mean IoU."""
  out = {}
  for row in document.get("rows") or []:
    if isinstance(row, Mapping) and "name" in row and isinstance(row.get("mean_iou"), Mapping):
      out[row["name"]] = {
        "mean_iou": row["mean_iou"],
        "paired_difference": row.get("paired_difference"),
      }
  return out


def run_suite(
  ctx: StudyContext,
  study: Callable[..., dict[str, Any]],
  stacks: Sequence[Stack],
  root: str,
  study_name: str,
  *,
  combine: Callable[[StudyContext, dict[str, Any]], dict[str, Any]] | None = None,
  legacy: Sequence[str] = (),
  **options: Any,
) -> dict[str, Any]:
  """Runs `study(ctx, **options)` on each stack and writes OUT/suite.json and suite.md.

  A study with a table of its own over the stacks passes `combine(ctx, {stack name:
  document})`, which writes it instead; `legacy` names the files of such a table written
  before folders were marked (`outputs.claim`).
  """
  try:
    outputs.claim(ctx.out, kind=KIND, flag="--out", directory=True, legacy=tuple(legacy))
  except outputs.OutputError as e:
    raise ValueError(str(e)) from e
  documents: dict[str, dict[str, Any]] = {}
  skipped: list[str] = []
  for stack in stacks:
    volume = prepare(stack, ctx, root)
    if volume is None:
      skipped.append(stack.name)
      continue
    ctx.log(f"stack {stack.name}: {volume}")
    one = dataclasses.replace(
      ctx,
      out=os.path.join(ctx.out, stack.name),
      stack_name=stack.name,
      volume=volume,
      train_slices=stack.train_slices or ctx.train_slices or ctx.budget.train_slices,
      eval_slices=stack.eval_slices or ctx.eval_slices or ctx.budget.eval_slices,
    )
    documents[stack.name] = study(one, **options)
  if combine is not None:
    return combine(ctx, documents)
  per_stack = {name: row_summary(document) for name, document in documents.items()}
  names = list(dict.fromkeys(r for rows in per_stack.values() for r in rows))
  rows = []
  for name in names:
    cells = {s: rows_[name] for s, rows_ in per_stack.items() if name in rows_}
    paired = [c["paired_difference"]["mean"] for c in cells.values() if c["paired_difference"]]
    rows.append(
      {
        "name": name,
        "stacks": cells,
        "mean_iou": seed_stats([c["mean_iou"]["mean"] for c in cells.values()]),
        "paired_difference": seed_stats(paired) if paired else None,
      }
    )
  document = {
    "study": study_name,
    "budget": ctx.budget.to_json(),
    "stacks": list(per_stack),
    "skipped": skipped,
    "rows": rows,
  }
  ctx.log(runs.write_document(ctx.out, "suite", document, markdown))
  return document


def markdown(document: Mapping[str, Any]) -> str:
  """Per row: each stack's mean IoU (and paired difference), then the mean over stacks."""
  stacks = document["stacks"]
  head = ["row", *stacks, "mean over stacks", "paired diff., mean over stacks"]
  cells = []
  for row in document["rows"]:
    line = [row["name"]]
    for s in stacks:
      c = row["stacks"].get(s)
      text = "-" if c is None else stat_text(c["mean_iou"])
      if c is not None and c["paired_difference"]:
        text += f" ({stat_text(c['paired_difference'])})"
      line.append(text)
    line += [stat_text(row["mean_iou"]), stat_text(row["paired_difference"])]
    cells.append(line)
  b = document["budget"]
  lines = [
    f"`fibseg study {document['study']}` over the stacks {', '.join(stacks)}; budget "
    f"{b['name']} ({steps_text(b)}). Each cell: mean IoU +- std over seeds (paired "
    "difference to the row's reference, same seeds); the last two columns: mean +- std "
    "over the stacks.",
    "",
  ]
  if document["skipped"]:
    lines += [f"Skipped (not built): {', '.join(document['skipped'])}.", ""]
  return "\n".join(lines + markdown_table(head, cells)) + "\n"
