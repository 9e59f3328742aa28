"""An ordinary resume or load of a healthy checkpoint prints no orbax or absl warning."""

import logging
import os
import subprocess
import sys

from fibseg_jax import checkpoint

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Trains 2 steps, reruns (resumes a finished run: the checks and the restore, no step),
# then loads the workdir and its step directory, with absl's handler on as under the
# command line (its warnings are lines "W1201 12:00:00.000 ...").
_TRAIN_RESUME_LOAD = """
import os, sys
from absl import logging
logging.use_absl_handler()
logging.set_verbosity(logging.WARNING)
sys.path.insert(0, os.path.join(sys.argv[1], "tests"))
from test_train import make_volume, tiny_config
from fibseg_jax import checkpoint
from fibseg_jax.train import loop
root = sys.argv[2]
path = make_volume(os.path.join(root, "vol.zarr"))
workdir = os.path.join(root, "run")
loop.train_and_evaluate(tiny_config(path, steps=2), workdir, progress=False)
print("resuming", file=sys.stderr, flush=True)
loop.train_and_evaluate(tiny_config(path, steps=2), workdir, progress=False)
assert checkpoint.load(workdir).step == 2
assert checkpoint.load(os.path.join(workdir, "checkpoints", "2")).step == 2
print("loaded", file=sys.stderr)
"""


def test_resume_and_load_print_no_warning(tmp_path):
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  done = subprocess.run(
    [sys.executable, "-c", _TRAIN_RESUME_LOAD, REPO, str(tmp_path)],
    capture_output=True,
    text=True,
    env=env,
    timeout=300,
    check=False,
  )
  assert done.returncode == 0, done.stderr[-3000:]
  assert "resuming from step 2" in done.stdout
  lines = done.stderr.splitlines()
  assert lines[-1] == "loaded" and "resuming" in lines
  assert not [line for line in lines if line.startswith(("W", "E"))], done.stderr
  assert "read only" not in done.stderr and "Metadata file" not in done.stderr


def _record(message: str, pathname: str, level: int = logging.WARNING) -> logging.LogRecord:
  return logging.LogRecord("absl", level, pathname, 1, message, (), None)


def test_only_orbax_routine_warnings_are_dropped():
  orbax = os.path.join("site-packages", "orbax", "checkpoint", "checkpoint_manager.py")
  routine = "Given directory is read only=%s"
  keep = checkpoint._RoutineOrbaxWarnings().filter
  assert not keep(_record(routine, orbax))
  assert not keep(_record("Metadata file does not exist: %s", orbax))
  # Anything else orbax says, the same words from elsewhere, or worse than a warning stays.
  assert keep(_record("Failed to read Metadata file: %s, error: %s", orbax))
  assert keep(_record(routine, os.path.join("site-packages", "mylib", "io.py")))
  assert keep(_record(routine, orbax, level=logging.ERROR))
  # The filter holds only while the checkpoint module works.
  with checkpoint._without_routine_warnings():
    assert checkpoint._ROUTINE_FILTER in logging.getLogger("absl").filters
  assert checkpoint._ROUTINE_FILTER not in logging.getLogger("absl").filters
