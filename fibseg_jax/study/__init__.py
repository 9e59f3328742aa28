"""The studies: each a module with `run(ctx, **options)` over one `StudyContext`
(`fibseg study NAME`), and the paper's comparison and artifact sweep in one call each.

Top of the import chain (it uses data, models, checkpoint, train, infer, eval and
baselines); experiments/study.py and experiments/sweep.py are its entry points.

  doc = study.run_study("study/", study.get_budget("quick"))   # study.json/.md/.png
  doc = study.run_sweep("sweep/", study.get_budget("quick"))   # sweep.json/.png
  doc = study.run_fourway("semi/", budget, study.OneStack(...), semi={...})  # fourway
"""

from fibseg_jax.study.budget import BUDGETS, PAPER, QUICK, SMOKE, Budget
from fibseg_jax.study.budget import FLAG_HELP as BUDGET_FLAG_HELP
from fibseg_jax.study.budget import get as get_budget
from fibseg_jax.study.comparison import (
  Row,
  StudyError,
  markdown,
  plan_rows,
  run_study,
  synthetic_volume,
)
from fibseg_jax.study.context import OneStack, Option, StudyContext
from fibseg_jax.study.runs import cache_compilations, run_network, run_route, score
from fibseg_jax.study.semi import run_fourway
from fibseg_jax.study.sweep import ARTIFACTS, METHODS, run_sweep

__all__ = [
  "ARTIFACTS",
  "BUDGETS",
  "BUDGET_FLAG_HELP",
  "METHODS",
  "PAPER",
  "QUICK",
  "SMOKE",
  "Budget",
  "OneStack",
  "Option",
  "Row",
  "StudyContext",
  "cache_compilations",
  "StudyError",
  "get_budget",
  "markdown",
  "plan_rows",
  "run_fourway",
  "run_network",
  "synthetic_volume",
  "run_route",
  "run_study",
  "run_sweep",
  "score",
]
