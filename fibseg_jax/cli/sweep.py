r"""Artifact sweep: mean IoU against curtaining, detector shading and noise severity.

  fibseg sweep --out=sweep/ [--budget=quick|paper] \
    [--best_from=study/study.json] [--recipe=artifacts]

Each artifact goes from 0 to 2x its default strength with the others at default, on
synthetic stacks of the same sample; at every level the best network on raw data (the
best row of --best_from, else the budget's: a 3-slice U-Net on ICE+TLD), the cleaned
classical route and the random forest are trained and scored as in study.py
(--recipe: the network also with parts of the training recipe, as in fibseg ablation). Writes
sweep.json and sweep.png (one panel per artifact). Rerunning resumes. --budget=quick
fits 60 minutes on 2 CPU cores. Compiled steps are cached in OUT/.jax_cache (or
$JAX_COMPILATION_CACHE_DIR).
"""

import sys

from absl import flags

from fibseg_jax import study
from fibseg_jax.cli import runner

_OUT = flags.DEFINE_string("out", None, "Output directory (created; resumed if it exists).")
_BUDGET = flags.DEFINE_string("budget", "quick", study.BUDGET_FLAG_HELP)
_BEST_FROM = flags.DEFINE_string(
  "best_from", None, "A study.json whose best raw-input network is swept."
)
_RECIPE = flags.DEFINE_list(
  "recipe",
  [],
  "Train the network with these parts of the recipe on (fibseg ablation's parts, e.g. "
  "artifacts: curtaining, shading, charging and drift augmentation); use a new --out.",
)


def main(argv):
  runner.begin(argv, required={"out": "sweep/"})
  study.cache_compilations(_OUT.value)
  try:
    study.run_sweep(
      _OUT.value,
      study.get_budget(_BUDGET.value),
      best_from=_BEST_FROM.value,
      recipe=_RECIPE.value,
      log=lambda line: print(line, flush=True),
    )
  except ValueError as e:  # user mistakes: flags, output directory
    sys.exit(f"error: {e}")
  print(f"wrote {_OUT.value}/sweep.json, sweep.png")


def run(argv: list[str] | None = None) -> None:
  """`fibseg sweep`: `main` under absl (see `runner.run_module`)."""
  runner.run_module(sys.modules[__name__], argv)
