r"""The shipped prior against the random forest, from strokes and whole slices, with seeds.

  python experiments/prior_study.py --out=results/prior \
    --stack=synthetic --stack=drosophila_vnc=/work/real/drosophila_vnc/vol.zarr:4,8,12:16

A stack is `synthetic` (the study budgets' generated stack) or NAME=VOLUME:TRAIN:EVAL
(comma lists of z). See fibseg_jax/study/prior.py.
"""

import functools
import sys

from absl import app, flags

from fibseg_jax.data import lists
from fibseg_jax.infer import enhance
from fibseg_jax.study import prior

_OUT = flags.DEFINE_string("out", None, "Output folder (finished cells are reused).")
_STACKS = flags.DEFINE_multi_string(
  "stack", ["synthetic"], "synthetic or NAME=VOLUME:TRAIN:EVAL; repeat for more stacks."
)
_LEVELS = flags.DEFINE_list("levels", list(prior.DEFAULT_LEVELS), "Annotation levels.")
_SEEDS = flags.DEFINE_list("seeds", ["0", "1", "2"], "Seeds of strokes and forest.")
_PRIOR = flags.DEFINE_string(
  "prior", enhance.PRIOR_DIR, "Folder of prior.msgpack/json; none: fit the forests only."
)


def _parse(text: str):
  if text == "synthetic":
    return prior.synthetic
  name, _, rest = text.partition("=")
  path, train, evaluate = rest.rsplit(":", 2)
  flag = f"--stack={text}"
  loader = functools.partial(
    prior.volume_stack,
    name,
    path,
    lists.parse_list(train, int, flag=flag),
    lists.parse_list(evaluate, int, flag=flag),
  )
  loader.__name__ = name
  return loader


def main(argv):
  if len(argv) > 1 or not _OUT.value:
    sys.exit("usage: prior_study.py --out=DIR [--stack=...]")
  try:
    stacks = [_parse(s) for s in _STACKS.value]
    prior.run(
      _OUT.value,
      stacks,
      levels=_LEVELS.value,
      seeds=[int(s) for s in _SEEDS.value],
      prior=None if _PRIOR.value == "none" else enhance.load_prior(_PRIOR.value),
    )
  except ValueError as e:
    sys.exit(f"error: {e}")
  if _PRIOR.value != "none":
    with open(f"{_OUT.value}/prior.md") as f:
      print(f.read())


if __name__ == "__main__":
  app.run(main)
