"""The prior study, now `fibseg study prior` (fibseg_jax/study/prior.py): this path runs it.

python experiments/prior_study.py --out=prior/ --stacks=synthetic,drosophila_vnc
"""

import sys

from fibseg_jax.cli import study

if __name__ == "__main__":
  study.run(["fibseg study", "prior", *sys.argv[1:]])
