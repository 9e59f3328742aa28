r"""`fibseg study NAME [--flags]`: every research study through one entry point.

  fibseg study                               # the studies, one line each
  fibseg study ablation --help               # one study's help and flags
  fibseg study ablation --out=ablation/ [--budget=quick] [--seeds=0,1,2] \
    [--config.train.learning_rate=1e-3]      # a config field for every cell

Flags every study shares: --out, --budget, --steps, --volume, --channels, --slices,
--seeds, --train_slices, --eval_slices, --rows, --stacks (a suite of stacks: any study
over each, per-stack results and their mean; fibseg_jax/study/suite.py); and
--config.FIELD=VALUE, as `fibseg
train` takes them (`fibseg train --config=unet --show_config` lists the fields), set in
the config of every network the study trains: over the budget's settings, under the
study's own rows. They are part of each cell's cached settings, so an --out holds one
setting. Rerunning a command resumes: finished cells are never recomputed. The first
commands (fibseg ablation, sweep, semi-study, distill-study, effort, ranking, tta-curve
and `fibseg study --out=...`, the comparison) still run the same studies.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib
import sys
from collections.abc import Sequence

from absl import flags

from fibseg_jax.cli import runner

# name -> (module of fibseg_jax.study, one line for `fibseg study`).
STUDIES: dict[str, tuple[str, str]] = {
  "comparison": ("comparison", "the paper's comparison: networks and classical routes"),
  "ablation": ("ablation", "the training recipe part by part, with seeds"),
  "sweep": ("sweep", "mean IoU against curtaining, shading and noise severity"),
  "semi": ("semi", "semi-supervised training and TTA, four ways; suggested slice vs random"),
  "distill": ("distill", "distil the seed ensemble into one fast network, with seeds"),
  "effort": ("effort", "mean IoU against labelling effort: strokes, slices; U-Net and forest"),
  "ranking": ("ranking", "which slice next: the suggested one against a random one, with seeds"),
  "tta": ("tta", "held-out mean IoU and cost against the number of TTA passes"),
  "regression": ("regression", "the release's defaults against an earlier release's, paired"),
  "prior": ("prior", "the shipped prior against the forest, from strokes and whole slices"),
}
# The first commands, one per study, kept so that their commands and folders still work.
ALIASES = {
  "study": "comparison",
  "ablation": "ablation",
  "sweep": "sweep",
  "semi-study": "semi",
  "distill-study": "distill",
  "effort": "effort",
  "ranking": "ranking",
  "tta-curve": "tta",
}
_HELP = ("-h", "--help", "-help", "--helpfull", "help")

_CHOSEN: dict = {}  # the study of this process: name, module, options, overrides


def listing() -> str:
  """What `fibseg study` prints: how to call it and every study in one line."""
  width = max(len(name) for name in STUDIES)
  lines = ["usage: fibseg study NAME [--flags]   (fibseg study NAME --help)", "", "studies:"]
  lines += [f"  {name:<{width}}  {summary}" for name, (_, summary) in STUDIES.items()]
  return "\n".join(lines)


def _ints(value: str | None, flag: str) -> tuple[int, ...] | None:
  from fibseg_jax.data import lists

  return lists.parse_list(value, int, flag=flag, error=ValueError, ranges=True) if value else None


def define_flags() -> None:
  """The flags every study shares (absl's are global: defined only when a study runs, so
  that `fibseg_jax.cli.main` can list the studies without them)."""
  flags.DEFINE_string("out", None, "Output directory (created; resumed if it exists).")
  flags.DEFINE_string(
    "budget", "quick", "Budget of the runs: quick, paper, smoke or a budget file (get_config())."
  )
  flags.DEFINE_integer("steps", None, "Training steps instead of the budget's.")
  flags.DEFINE_string("volume", None, "Volume; default a synthetic stack in --out.")
  flags.DEFINE_list("channels", None, "Input channels; default all of the volume's.")
  flags.DEFINE_integer("slices", 3, "Slab depth of the U-Net.")
  flags.DEFINE_string("seeds", None, "Training seeds, e.g. 0,1,2 (default the study's).")
  flags.DEFINE_string("train_slices", None, "Slices to train on, e.g. 4,8,12.")
  flags.DEFINE_string("eval_slices", None, "Slices to score on, e.g. 16 or 16-18.")
  flags.DEFINE_list("rows", None, "Only these rows (names or fnmatch patterns).")
  flags.DEFINE_string("stacks", None, "Run over these stacks: suite, or names (study/suite.py).")
  flags.DEFINE_string("stacks_root", None, "Folder of the real stacks ($FIBSEG_STACKS).")


def main(argv):
  from fibseg_jax import study as study_lib
  from fibseg_jax.study import suite

  f = flags.FLAGS
  runner.begin(argv, required={"out": f"{_CHOSEN['name']}/"})
  module = _CHOSEN["module"]
  try:
    budget = study_lib.get_budget(f.budget)
    if f.steps:  # validation every as many steps in proportion
      every = max(1, f.steps * budget.eval_every // budget.steps)
      budget = dataclasses.replace(budget, steps=f.steps, eval_every=every)
    budget = dataclasses.replace(budget, overrides=tuple(_CHOSEN["overrides"].items()))
    ctx = study_lib.StudyContext(
      out=f.out,
      budget=budget,
      volume=f.volume,
      channels=tuple(f.channels) if f.channels else None,
      slices=f.slices,
      seeds=_ints(f.seeds, "--seeds"),
      train_slices=_ints(f.train_slices, "--train_slices"),
      eval_slices=_ints(f.eval_slices, "--eval_slices"),
      rows=tuple(f.rows) if f.rows else None,
      log=lambda line: print(line, flush=True),
    )
    study_lib.cache_compilations(ctx.out)
    options = {o.name: flags.FLAGS[o.name].value for o in getattr(module, "OPTIONS", ())}
    if f.stacks:
      stacks, root = suite.resolve(f.stacks), suite.stacks_root(f.stacks_root)
      own = getattr(module, "SUITE", {})  # a study's own table over the stacks
      suite.run_suite(ctx, module.run, stacks, root, _CHOSEN["name"], **own, **options)
    else:
      module.run(ctx, **options)
  except ValueError as e:  # user mistakes: flags, volume, folder (every *Error here is one)
    sys.exit(f"error: {e}")


def choose(prog: str, args: Sequence[str]) -> tuple[str, list[str]]:
  """(study name, its flags) of `fibseg study NAME ...` or an old command `fibseg ablation ...`.

  `fibseg study` alone (or with --help) prints the studies and exits 0.
  """
  command = prog.split()[-1]
  if command in ALIASES and command != "study":
    return ALIASES[command], list(args)
  if args and not args[0].startswith("-") and args[0] != "help":
    name = args[0]
    if name not in STUDIES:
      close = difflib.get_close_matches(name, list(STUDIES), n=1, cutoff=0.5)
      hint = f"did you mean 'fibseg study {close[0]}'?" if close else "fibseg study lists them"
      runner.usage_error(f"unknown study {name!r}; {hint}")
    return name, list(args[1:])
  if args and args[0] not in _HELP:
    return "comparison", list(args)  # the first `fibseg study --out=...`
  print(listing())
  sys.exit(0)


def run(argv: list[str] | None = None) -> None:
  """`fibseg study NAME` (or an old command): the study's flags, then `main` under absl."""
  from fibseg_jax.cli import config_args

  argv = list(sys.argv if argv is None else argv)
  name, args = choose(argv[0], argv[1:])
  try:
    args, overrides = config_args.split_overrides(args)
  except config_args.ConfigArgError as e:
    runner.usage_error(str(e))
  module = importlib.import_module(f"fibseg_jax.study.{STUDIES[name][0]}")
  for option in getattr(module, "OPTIONS", ()):
    define = getattr(flags, f"DEFINE_{option.kind}")
    define(option.name, option.default, option.help)
  define_flags()
  _CHOSEN.update(name=name, module=module, overrides=overrides)
  this = sys.modules[__name__]
  this.__doc__ = f"{module.USAGE}\n{__doc__}"
  runner.run_module(this, [f"fibseg study {name}", *args])
