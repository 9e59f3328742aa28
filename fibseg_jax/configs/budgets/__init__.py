"""Budgets of the study and the artifact sweep, as config files (`fibseg study --budget=`).

Each file's `get_config()` starts from `base.get_config()` (what every budget shares)
and sets what makes its cost: `quick` for 2 CPU cores, `paper` for an accelerator,
`smoke` for the tests. `fibseg_jax.study.budget.get` turns a config into the typed
`Budget`; `--budget=my_budget.py` takes a file of your own with a `get_config()`.
"""

import os

DIRECTORY = os.path.dirname(os.path.abspath(__file__))
