"""What every subcommand shares: absl's app.run with one-line errors and Ctrl-C.

A subcommand module defines its flags at import, a `main(argv)` and
`run(argv=None)`, which calls `run_module` here.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from types import ModuleType
from typing import Any, NoReturn

from absl import app, flags, logging

# Exit status of a run stopped by Ctrl-C (128 + SIGINT), as shells report it.
INTERRUPTED_EXIT = 130
# absl's help flags: each prints the help (and exits 1 in absl; 0 here).
HELP_FLAGS = ("-h", "-?", "--help", "-help", "--helpfull", "-helpfull", "--helpshort", "-helpshort")
# Exit status of a command-line mistake found before main runs (a flag, a config field).
USAGE_EXIT = 2


def usage_error(message: str) -> NoReturn:
  """Prints `error: message` as one line on stderr and exits with status 2."""
  print(f"error: {' '.join(message.split())}", file=sys.stderr)
  sys.exit(USAGE_EXIT)


def interrupted(error: KeyboardInterrupt) -> NoReturn:
  """Ctrl-C: one line on stderr (what the interrupted work said, if anything), status 130."""
  message = str(error)
  print(f"interrupted: {message}" if message else "interrupted", file=sys.stderr)
  sys.exit(INTERRUPTED_EXIT)


def guarded(main: Callable[[list[str]], Any]) -> Callable[[list[str]], Any]:
  """`main` with a KeyboardInterrupt turned into one line and exit status 130.

  The training loop raises KeyboardInterrupt("stopped at step N: checkpoint saved in
  ...") after saving; that message is the line. Any other exception keeps its traceback.
  """

  def run_main(argv: list[str]) -> Any:
    try:
      return main(argv)
    except KeyboardInterrupt as e:
      interrupted(e)

  return run_main


def begin(argv: Sequence[str], *, required: dict[str, str] | None = None) -> None:
  """The start of a long-running subcommand's main: absl logs at ERROR (orbax logs every
  step of a restore at INFO) unless --verbosity is given; no stray arguments; the
  `required` flags (name -> example value) given.
  """
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.ERROR)
  if len(argv) > 1:
    sys.exit(f"error: unexpected arguments {list(argv[1:])}")
  for name, example in (required or {}).items():
    if not flags.FLAGS[name].value:
      sys.exit(f"error: --{name} is required, e.g. --{name}={example}")


def parse_flags(argv: Sequence[str]) -> list[str]:
  """absl's flag parsing, with a mistake as one line (`error: ...`) and exit status 2."""
  try:
    return flags.FLAGS(list(argv))
  except flags.Error as e:
    usage_error(str(e))


def run_module(module: ModuleType, argv: Sequence[str] | None = None) -> None:
  """Runs a subcommand module's `main` under absl, as `fibseg NAME` or experiments/NAME.py.

  `--help` shows the module's docstring and its flags (absl shows those of `__main__`,
  which is the `fibseg` script or an experiments/ shim, not this module).

  Args:
    module: the subcommand's module: its flags are defined, it has `main(argv)`.
    argv: program name and arguments; default `sys.argv`.
  """
  argv = list(sys.argv if argv is None else argv)
  sys.modules["__main__"].__doc__ = module.__doc__
  for flag in flags.FLAGS.get_key_flags_for_module(module.__name__):
    flags.FLAGS.register_key_flag_for_module(sys.argv[0], flag)
  try:
    app.run(guarded(module.main), argv=argv, flags_parser=parse_flags)
  except KeyboardInterrupt as e:  # during flag parsing or absl's start-up
    interrupted(e)
  except SystemExit as e:
    # absl's --help prints the help and exits 1; asking for help is no failure.
    if e.code == 1 and asks_for_help(argv[1:]):
      sys.exit(0)
    raise


def asks_for_help(args: Sequence[str]) -> bool:
  """Whether a subcommand's arguments hold one of absl's help flags (before any --)."""
  for arg in args:
    if arg == "--":
      return False
    if arg.split("=", 1)[0] in HELP_FLAGS:
      return True
  return False
