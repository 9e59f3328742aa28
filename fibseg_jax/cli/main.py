"""`fibseg COMMAND [--flags]`: the installed command (setup.cfg's console script).

  fibseg --help                 # the subcommands, one line each
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

# name -> (module, one line for `fibseg --help`), in the order of the workflow.
COMMANDS: dict[str, tuple[str, str]] = {
  "make-synthetic": (
    "fibseg_jax.cli.make_synthetic",
    "generate a synthetic FIB-SEM stack with known truth",
  ),
  "ingest": ("fibseg_jax.cli.ingest", "folders of per-slice images and label slices -> a volume"),
  "train": ("fibseg_jax.cli.train", "train a U-Net or Sensor-3D on the annotated slices"),
  "segment": ("fibseg_jax.cli.segment", "segment every slice with trained models, tile by tile"),
  "evaluate": ("fibseg_jax.cli.evaluate", "score against hand labels: metrics, fractions, figures"),
  "suggest": ("fibseg_jax.cli.suggest", "rank unannotated slices by uncertainty: label which next"),
  "study": ("fibseg_jax.cli.study", "the paper's comparison: networks and classical routes"),
  "sweep": ("fibseg_jax.cli.sweep", "mean IoU against curtaining, shading and noise severity"),
  "semi-study": (
    "fibseg_jax.cli.semi_study",
    "semi-supervised training and TTA, four ways; suggested slice vs random",
  ),
  "ablation": (
    "fibseg_jax.cli.ablation",
    "the training recipe part by part, with seeds",
  ),
  "distill-study": (
    "fibseg_jax.cli.distill_study",
    "distil the seed ensemble into one fast network, with seeds",
  ),
  "effort": (
    "fibseg_jax.cli.effort",
    "mean IoU against labelling effort: strokes, slices, every Nth; U-Net and forest",
  ),
  "ranking": (
    "fibseg_jax.cli.ranking",
    "which slice next: the ensemble's suggestion against a random slice, with seeds",
  ),
  "tta-curve": (
    "fibseg_jax.cli.tta_curve",
    "held-out mean IoU and cost against the number of TTA passes",
  ),
  "bench": ("fibseg_jax.cli.benchmark", "speed against MONAI and the targets"),
}
_HELP = ("-h", "--help", "-help", "--helpfull", "help")


def usage() -> str:
  """What `fibseg --help` prints: how to call it and every subcommand in one line."""
  width = max(len(name) for name in COMMANDS)
  lines = [
    "usage: fibseg COMMAND [--flags]   (fibseg COMMAND --help lists its flags)",
    "",
    "commands:",
  ]
  lines += [f"  {name:<{width}}  {summary}" for name, (_, summary) in COMMANDS.items()]
  return "\n".join(lines)


def run(argv: Sequence[str] | None = None) -> None:
  """Runs `fibseg COMMAND ...`: argv[1] names the subcommand, the rest are its flags."""
  argv = list(sys.argv if argv is None else argv)
  if len(argv) < 2:
    print(usage(), file=sys.stderr)
    sys.exit(runner.USAGE_EXIT)
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
  if name not in COMMANDS:
    close = difflib.get_close_matches(name, list(COMMANDS), n=1, cutoff=0.5)
    hint = f"did you mean 'fibseg {close[0]}'?" if close else "fibseg --help lists them"
    runner.usage_error(f"unknown command {command!r}; {hint}")
  try:
    module = importlib.import_module(COMMANDS[name][0])
  except KeyboardInterrupt as e:  # Ctrl-C while JAX loads
    runner.interrupted(e)
  module.run([f"fibseg {name}", *rest])
