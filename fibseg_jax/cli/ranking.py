r"""Does annotating the suggested slice beat annotating a random one?

  fibseg ranking --out=ranking/ [--budget=quick] [--seeds=0,1,2] [--drift=1]
  fibseg ranking --out=ranking_real/ --volume=vol.zarr --train_slices=4,8,12 \
    --eval_slices=16

Trains a U-Net per seed on the training slices (the members of an ensemble), ranks the
other labelled slices by the members' disagreement (spread along z, as `fibseg suggest`
does), and trains each seed again with one more slice: the suggested one, the seed's
own most uncertain one (entropy) or a random one; all scored on --eval_slices. Also
counts how often the truth's phase fractions, connectivity, surface density and pore
sizes fall inside the members' ranges. Writes ranking.json and ranking.md. Without
--volume a synthetic stack labelled on every slice is generated in --out, its artifacts
growing along z by --drift (so its slices differ). Reruns resume.
"""

import os
import sys

from absl import flags

from fibseg_jax import study
from fibseg_jax.cli import runner, stack_flags
from fibseg_jax.data import volume as volume_lib
from fibseg_jax.study import ranking

_DRIFT = flags.DEFINE_float(
  "drift", 1.0, "Growth of the synthetic stack's artifacts along z (1 = twice at the end)."
)


def main(argv):
  runner.begin(argv, required={"out": "ranking/"})
  out = stack_flags.OUT.value
  if _DRIFT.value < 0:
    sys.exit(f"error: --drift={_DRIFT.value}: expected a number >= 0")
  try:
    ranking.claim_directory(out, stack_flags.VOLUME.value)
  except ValueError as e:
    sys.exit(f"error: {e}")
  study.cache_compilations(out)
  log = lambda line: print(line, flush=True)  # noqa: E731
  try:
    budget = stack_flags.budget()
    common = stack_flags.stack(budget, annotate=range(budget.shape[0]), drift=_DRIFT.value)
    ranking.run_ranking(out, budget, log=log, **common)
  except (ValueError, volume_lib.VolumeError) as e:  # user mistakes
    sys.exit(f"error: {e}")
  print(open(os.path.join(out, "ranking.md")).read())
  print(f"wrote {out}/ranking.json, ranking.md")


def run(argv: list[str] | None = None) -> None:
  """`fibseg ranking`: `main` under absl (see `runner.run_module`)."""
  runner.run_module(sys.modules[__name__], argv)
