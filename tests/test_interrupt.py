"""Ctrl-C in segmentation: it stops after the block in progress, and a rerun resumes.

(Ctrl-C in training is tested in test_train.py, against its uninterrupted reference run.)
"""

import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import segment_child  # noqa: E402 - the tiny model
import test_infer  # noqa: E402 - its volume and segment() defaults

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BLOCKS = 5 * 3 * 2  # test_infer.SHAPE in blocks of 32

# segment_volume with test_infer's defaults, its third block held back until the test has
# sent SIGINT ("hold"), or given two Ctrl-C of its own ("twice"). KeyboardInterrupt is
# caught as the command line does (one line, exit status 130).
_SEGMENT_HELD_AT_BLOCK_3 = """
import os, signal, sys, time
sys.path.insert(0, os.path.join(sys.argv[1], "tests"))
import segment_child
from fibseg_jax import infer
from fibseg_jax.infer import blend
mode, root, output, ready, go = sys.argv[2:7]
blended, calls = blend.RegionBlender.__call__, []
def held(self, slab, tile_yx):
  calls.append(len(calls))
  if len(calls) == 3 and mode == "twice":
    signal.raise_signal(signal.SIGINT)
    signal.raise_signal(signal.SIGINT)
  elif len(calls) == 3:
    open(ready, "w").close()
    deadline = time.time() + 120
    while not os.path.exists(go) and time.time() < deadline:
      time.sleep(0.01)
  return blended(self, slab, tile_yx)
blend.RegionBlender.__call__ = held
model, variables = segment_child.pixel_model(3, 2)
try:
  infer.segment_volume(
    root, model, variables, output=output, channels=("ICE", "TLD"), slices=3,
    settings=infer.SegmentSettings(tile=16, overlap=4, block=32, batch=3, progress=False),
  )
except KeyboardInterrupt as e:
  print(f"interrupted: {e}", file=sys.stderr)
  sys.exit(130)
"""


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
  """(volume path, labels of an uninterrupted segmentation)."""
  root = test_infer.make_volume(str(tmp_path_factory.mktemp("stack") / "vol.zarr"))
  reference = test_infer.memory_root("reference")
  test_infer.segment(root, _pixel(), reference)
  return root, test_infer.read(reference)


def _pixel():
  return segment_child.pixel_model(3, len(test_infer.CHANNELS))


def _start(mode, root, output, tmp_path):
  ready, go = str(tmp_path / "ready"), str(tmp_path / "go")
  proc = subprocess.Popen(
    [sys.executable, "-c", _SEGMENT_HELD_AT_BLOCK_3, REPO, mode, root, output, ready, go],
    env=dict(os.environ, JAX_PLATFORMS="cpu"),
    stdout=subprocess.PIPE,
    stderr=subprocess.PIPE,
    text=True,
  )
  return proc, ready, go


def _rerun_resumes(root, output, reference, done_before):
  result = test_infer.segment(root, _pixel(), output)
  assert result.blocks_skipped == done_before and result.blocks_done == BLOCKS - done_before
  assert result.complete
  np.testing.assert_array_equal(test_infer.read(output), reference)


def test_ctrl_c_stops_after_the_block_in_progress_and_the_rerun_resumes(stack, tmp_path):
  root, reference = stack
  output = str(tmp_path / "seg.zarr")
  proc, ready, go = _start("hold", root, output, tmp_path)
  deadline = time.time() + 180
  while not os.path.exists(ready) and time.time() < deadline and proc.poll() is None:
    time.sleep(0.02)
  assert os.path.exists(ready), proc.communicate()[1][-3000:]
  proc.send_signal(signal.SIGINT)
  open(go, "w").close()
  _, stderr = proc.communicate(timeout=180)
  assert proc.returncode == 130, stderr[-3000:]
  assert "Traceback" not in stderr
  # The third block, computing when Ctrl-C came, was finished, written and marked done.
  assert stderr.strip().splitlines()[-1] == (
    f"interrupted: stopped after 3 of {BLOCKS} blocks; rerun the same command to resume"
  )
  _rerun_resumes(root, output, reference, done_before=3)


def test_a_second_ctrl_c_abandons_the_block_but_keeps_those_before(stack, tmp_path):
  root, reference = stack
  output = str(tmp_path / "seg.zarr")
  proc, _, _ = _start("twice", root, output, tmp_path)
  _, stderr = proc.communicate(timeout=180)
  assert proc.returncode == 130 and "Traceback" not in stderr, stderr[-3000:]
  assert stderr.strip().splitlines()[-1] == (
    f"interrupted: stopped after 2 of {BLOCKS} blocks (the block in progress abandoned); "
    "rerun the same command to resume"
  )
  _rerun_resumes(root, output, reference, done_before=2)
