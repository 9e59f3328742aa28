"""The regression row: the release's defaults against an earlier release's, paired by seed.

  fibseg study regression --out=regression/ --against=719dc17 --stacks=suite

The earlier release's U-Net config is read from its own code: `git archive COMMIT
fibseg_jax` into OUT/against/, then its `fibseg_jax/configs/unet.py` (or
`experiments/configs/unet.py`) is loaded in a child process with that tree first on the
path, so its `base_config()` is the one it shipped. Two rows per seed, both trained by
today's code on the same stack, slices and budget:

  previous  the U-Net config with every field the earlier release set otherwise (and
            today's config still has) at the earlier value
  release   the U-Net config as it ships now

The fields the budget and the stack set (steps, batch, patch, widths, data path,
channels, slices, seed, validation) are the same in both rows; --config.FIELD=VALUE
applies to both, but the previous row's changed fields keep the earlier value. The
table lists the changed fields and the paired difference release - previous; with
--stacks=suite the suite table adds each stack's and their mean.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tarfile
import time
from collections.abc import Mapping
from typing import Any

from fibseg_jax import configs
from fibseg_jax.data import volume as volume_lib
from fibseg_jax.study import context, runs
from fibseg_jax.train import config as config_lib

KIND = "regression study"
# Fields the budget and the stack set in every cell (`runs.network_config`): not defaults.
CELL_FIELDS = (
  "data.path",
  "data.channels",
  "data.eval_slices",
  "data.slices",
  "data.patch",
  "data.val_block",
  "data.workers",
  "model.depth",
  "model.features",
  "train.seed",
  "train.steps",
  "train.batch_size",
  "train.eval_every",
  "train.warmup_steps",
  "train.log_every",
)
CONFIG_PATHS = ("fibseg_jax/configs/unet.py", "experiments/configs/unet.py")
# Run in the child, with the earlier tree first on sys.path: its U-Net config's fields.
_CHILD = """
import importlib.util, json, sys
spec = importlib.util.spec_from_file_location("earlier_unet", sys.argv[1])
module = importlib.util.module_from_spec(spec)
spec.loader.exec_module(module)
def flat(d, prefix=""):
  out = {}
  for k, v in d.items():
    out.update(flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
  return out
print(json.dumps(flat(module.get_config().to_dict()), default=list))
"""


def earlier_fields(commit: str, directory: str) -> dict[str, Any]:
  """{dotted field: value} of the U-Net config of `commit`, read by its own code.

  Raises:
    ValueError: not a commit of this repository, or no U-Net config in it.
  """
  repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  archive = subprocess.run(
    ["git", "-C", repo, "archive", "--format=tar", commit, "fibseg_jax", "experiments/configs"],
    capture_output=True,
  )
  if archive.returncode != 0:
    reason = archive.stderr.decode(errors="replace").strip().splitlines()[-1:] or ["?"]
    raise ValueError(f"--against={commit}: not a commit of {repo} ({reason[0]})")
  os.makedirs(directory, exist_ok=True)
  with tarfile.open(fileobj=io.BytesIO(archive.stdout)) as tar:
    tar.extractall(directory, filter="data")
  found = [p for p in CONFIG_PATHS if os.path.exists(os.path.join(directory, p))]
  if not found:
    raise ValueError(f"--against={commit}: no U-Net config ({' or '.join(CONFIG_PATHS)})")
  child = subprocess.run(
    [sys.executable, "-c", _CHILD, os.path.join(directory, found[0])],
    capture_output=True,
    text=True,
    cwd=directory,
    env={**os.environ, "PYTHONPATH": directory, "JAX_PLATFORMS": "cpu"},
  )
  if child.returncode != 0:
    last = (child.stderr.strip().splitlines() or ["?"])[-1]
    raise ValueError(f"--against={commit}: its {found[0]} does not load ({last})")
  return json.loads(child.stdout.strip().splitlines()[-1])


def changed_fields(earlier: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
  """{field: {"previous", "release"}} of the defaults that differ, the cell's own left out;
  a field today's config lacks, or whose type changed, is not compared."""
  release = config_lib.flat_fields(configs.load(configs.path("unet")))
  out = {}
  for name, value in earlier.items():
    if name in CELL_FIELDS or name not in release:
      continue
    now = release[name]
    now_json = json.loads(json.dumps(now, default=list))
    if now_json == value or type(now_json) is not type(value):
      continue
    out[name] = {"previous": value, "release": now_json}
  return out


def _previous(changed: Mapping[str, Mapping[str, Any]]):
  values = {
    name: tuple(c["previous"]) if isinstance(c["previous"], list) else c["previous"]
    for name, c in changed.items()
  }
  return lambda config: runs.set_fields(config, values)


OPTIONS = (
  context.Option("against", "string", None, "The earlier release: a git tag or commit, e.g. v0.3."),
)


def run(ctx: context.StudyContext, against: str | None = None) -> dict[str, Any]:
  """`fibseg study regression`: previous and release rows per seed; regression.json/.md."""
  if not against:
    raise ValueError("--against is required: the earlier release's git tag or commit")
  runs.claim_study_directory(ctx.out, ctx.volume, kind=KIND)
  changed = changed_fields(earlier_fields(against, os.path.join(ctx.out, "against")))
  stack = ctx.stack()
  vol = volume_lib.open_volume(stack.volume)
  results: dict[str, list[dict[str, Any]]] = {"previous": [], "release": []}
  for seed in stack.seeds:
    for name in results:
      start = time.perf_counter()
      settings = runs.cell_settings(
        ctx.budget, stack, seed, defaults=name, changed=changed if name == "previous" else {}
      )
      r = runs.train_and_score(
        os.path.join(ctx.out, f"{name}_s{seed}"),
        ctx.budget,
        settings,
        stack,
        seed,
        truth_volume=vol,
        configure=_previous(changed) if name == "previous" else None,
      )
      results[name].append(r)
      ctx.log(f"{name} seed {seed}: mIoU {r['mean_iou']:.4f} ({time.perf_counter() - start:.0f} s)")
  rows = [
    {
      "name": name,
      "seeds": [r["seed"] for r in rs],
      "mean_iou": context.seed_stats([r["mean_iou"] for r in rs]),
      "values": [r["mean_iou"] for r in rs],
      "paired_difference": (
        context.seed_stats(context.paired_differences(rs, results["previous"]))
        if name == "release"
        else None
      ),
    }
    for name, rs in results.items()
  ]
  document = {
    "volume": stack.volume,
    "against": against,
    "changed": changed,
    "seeds": [int(s) for s in stack.seeds],
    "budget": ctx.budget.to_json(),
    "rows": rows,
  }
  ctx.log(runs.write_document(ctx.out, "regression", document, markdown))
  return document


def markdown(document: Mapping[str, Any]) -> str:
  """The two rows and the paired difference, then the defaults that changed."""
  b = document["budget"]
  lines = [
    f"Release defaults against {document['against']}'s on {document['volume']}; budget "
    f"{b['name']} ({context.steps_text(b)}); seeds {document['seeds']}; paired difference "
    "release - previous, same seed.",
    "",
  ]
  cells = [
    [r["name"], context.stat_text(r["mean_iou"]), context.stat_text(r["paired_difference"])]
    for r in document["rows"]
  ]
  lines += context.markdown_table(["defaults", "mean IoU", "paired diff."], cells)
  changed = document["changed"]
  lines += [
    "",
    "Changed defaults: "
    + (", ".join(f"{k} {v['previous']} -> {v['release']}" for k, v in changed.items()) or "none")
    + ".",
  ]
  return "\n".join(lines) + "\n"


USAGE = __doc__
