"""`fibseg COMMAND [--flags]`: the installed command (setup.cfg's console script).

  fibseg --help                 # the subcommands, one line each (also: fibseg alone)
  fibseg train --help           # one subcommand's flags
  python -m fibseg_jax.cli ingest ...

Only the module of the subcommand given is imported: absl's flags are global, and two
subcommands define flags of the same name (--out, --volume, ...).
"""

from __future__ import annotations

import difflib
import importlib
import sys
from collections.abc import Sequence

import fibseg_jax
from fibseg_jax.cli import runner
from fibseg_jax.cli import study as study_cli

# name -> (module, one line for `fibseg --help`): the product, in the order of the workflow,
# then the research wing.
PRODUCT: dict[str, tuple[str, str]] = {
  "make-synthetic": (
    "fibseg_jax.cli.make_synthetic",
    "generate a synthetic FIB-SEM stack with known truth",
  ),
  "ingest": ("fibseg_jax.cli.ingest", "folders of per-slice images and label slices -> a volume"),
  "preview": (
    "fibseg_jax.cli.preview",
    "brush strokes -> slices segmented in about a minute: a forest + the shipped prior",
  ),
  "train": ("fibseg_jax.cli.train", "train a U-Net or Sensor-3D on the annotated slices"),
  "segment": ("fibseg_jax.cli.segment", "segment every slice with trained models, tile by tile"),
  "evaluate": ("fibseg_jax.cli.evaluate", "score against hand labels: metrics, fractions, figures"),
  "suggest": ("fibseg_jax.cli.suggest", "rank unannotated slices by uncertainty: label which next"),
  "pretrain": ("fibseg_jax.cli.pretrain", "train the prior on generated FIB-SEM stacks (it ships)"),
}
RESEARCH: dict[str, tuple[str, str]] = {
  "study": ("fibseg_jax.cli.study", "the research studies, one entry point: fibseg study NAME"),
  "bench": ("fibseg_jax.cli.benchmark", "speed against MONAI and the targets"),
}
COMMANDS = {**PRODUCT, **RESEARCH}
# The first research commands, each now `fibseg study NAME`: they run, unlisted.
HIDDEN = {
  name: ("fibseg_jax.cli.study", f"fibseg study {study}")
  for name, study in study_cli.ALIASES.items()
  if name != "study"
}
_HELP = ("-h", "--help", "-help", "--helpfull", "help")
# Exit status of `fibseg` with no command: it prints the usage, as --help does.
NO_COMMAND_EXIT = 0


def usage() -> str:
  """What `fibseg --help` prints: how to call it, the product commands, then the research
  ones (with the studies `fibseg study` runs)."""
  width = max(len(name) for name in COMMANDS)
  rows = lambda table: [f"  {n:<{width}}  {summary}" for n, (_, summary) in table.items()]  # noqa: E731
  return "\n".join(
    [
      "usage: fibseg COMMAND [--flags]   (fibseg COMMAND --help lists its flags)",
      "",
      "commands:",
      *rows(PRODUCT),
      "",
      "research:",
      *rows(RESEARCH),
      f"  {'':<{width}}  studies: {', '.join(study_cli.STUDIES)}",
    ]
  )


def run(argv: Sequence[str] | None = None) -> None:
  """Runs `fibseg COMMAND ...`: argv[1] names the subcommand, the rest are its flags."""
  argv = list(sys.argv if argv is None else argv)
  if len(argv) < 2:
    print(usage())
    sys.exit(NO_COMMAND_EXIT)
  command, rest = argv[1], argv[2:]
  if command in _HELP:
    if command == "help" and rest:  # fibseg help train
      command, rest = rest[0], ["--help"]
    else:
      print(usage())
      sys.exit(0)
  if command == "--version":
    print(f"fibseg {fibseg_jax.__version__}")
    sys.exit(0)
  name = command.replace("_", "-")  # fibseg make_synthetic, as the script is named
  commands = {**COMMANDS, **HIDDEN}
  if name not in commands:
    close = difflib.get_close_matches(name, list(COMMANDS), n=1, cutoff=0.5)
    hint = f"did you mean 'fibseg {close[0]}'?" if close else "fibseg --help lists them"
    runner.usage_error(f"unknown command {command!r}; {hint}")
  try:
    module = importlib.import_module(commands[name][0])
  except KeyboardInterrupt as e:  # Ctrl-C while JAX loads
    runner.interrupted(e)
  module.run([f"fibseg {name}", *rest])
