"""`fibseg semi-study`, now `fibseg study` (cli/study.py): the script path still works."""

import sys

from fibseg_jax.cli import study

if __name__ == "__main__":
  study.run(["fibseg semi-study", *sys.argv[1:]])
