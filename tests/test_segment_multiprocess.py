"""experiments/segment.py as two local processes (jax.distributed over gloo) on one volume.

The two processes must together write exactly what one process writes, voxel for voxel,
each block segmented by exactly one of them; and after one process is killed with
SIGKILL mid-run, rerunning the same command must finish the job with the same result,
redoing no block that was marked done.
"""

import os
import re
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from fibseg_jax import checkpoint, infer, models
from fibseg_jax.data import volume
from fibseg_jax.infer import store
from fibseg_jax.train import config as config_lib

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import segment_child  # noqa: E402 - random weights without compiling an init

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SEGMENT = os.path.join(REPO, "experiments", "segment.py")
CLASSES = ("pore", "solid", "grain")
SHAPE = (16, 128, 128)
BLOCK = 32
ALL_BLOCKS = SHAPE[0] * (SHAPE[1] // BLOCK) * (SHAPE[2] // BLOCK)  # 256
_KEYS = re.compile(r"segmented blocks \(z\.y0\.x0\): ?(.*)$", re.MULTILINE)
_MARKER = re.compile(r"\d+\.\d+\.\d+")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
  """A volume and a workdir holding one checkpoint of the smallest U-Net."""
  root = tmp_path_factory.mktemp("multiprocess")
  rng = np.random.default_rng(0)
  path = str(root / "vol.zarr")
  with volume.create_volume(
    path,
    shape=SHAPE,
    dtype="uint16",
    channels=("ICE", "TLD"),
    classes=CLASSES,
    voxel_size_nm=(50, 25, 25),
  ) as w:
    for z in range(SHAPE[0]):
      w.write_slice(z, rng.integers(1000, 9000, (*SHAPE[1:], 2)).astype(np.uint16))
    w.commit()
  config = config_lib.base_config()
  config.model.update(
    {"name": "unet", "num_classes": 3, "depth": 1, "features": (4, 4), "norm": "batch"}
  )
  config.data.classes = CLASSES
  variables = segment_child.random_variables(models.build(config.model), (1, 3, 16, 16, 2))
  workdir = root / "run"
  mngr = checkpoint.manager(str(workdir / "checkpoints"))
  checkpoint.save(mngr, 1, dict(variables), config, {"step": 1})
  mngr.wait_until_finished()
  return path, str(workdir), root


def _free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _start(setup, out, process_id=None, port=None):
  """Starts segment.py; stdout and stderr go to files, so no pipe fills while we wait."""
  path, workdir, _ = setup
  cmd = [
    sys.executable,
    SEGMENT,
    f"--workdir={workdir}",
    f"--input={path}",
    f"--output={out}",
    f"--probabilities={out}.probs",
    "--tile=32",
    "--overlap=8",
    f"--block={BLOCK}",
    "--batch=4",
    "--notta",  # a random tiny model: averaged over 16 views it predicts one class
    "--verbosity=0",  # the list of segmented blocks is logged at INFO
  ]
  name = out + ("" if process_id is None else f".{process_id}")
  if process_id is not None:
    cmd += [
      f"--coordinator_address=127.0.0.1:{port}",
      "--num_processes=2",
      f"--process_id={process_id}",
    ]
  logs = {}
  for stream in ("stdout", "stderr"):
    logs[stream] = open(f"{name}.{stream}", "w+")  # noqa: SIM115 - closed by _finish
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="")
  proc = subprocess.Popen(cmd, env=env, cwd=REPO, stdout=logs["stdout"], stderr=logs["stderr"])
  return proc, logs


def _finish(proc, logs, timeout=60):
  """(return code, stdout, stderr) once the process ends."""
  try:
    proc.wait(timeout=timeout)
  finally:
    if proc.poll() is None:
      proc.kill()
      proc.wait()
  texts = []
  for stream in ("stdout", "stderr"):
    logs[stream].seek(0)
    texts.append(logs[stream].read())
    logs[stream].close()
  return proc.returncode, *texts


def _segmented(stderr):
  (keys,) = _KEYS.findall(stderr)
  return keys.split()


def _two_processes(setup, out):
  port = _free_port()
  return [_start(setup, out, i, port) for i in range(2)]


def _read(path):
  return infer.open_array(path).read().result()


def _markers(out):
  """Keys of the done-markers on disk.

  A process killed while writing a marker leaves only tensorstore's 'KEY.__lock' file,
  which marks nothing (the library's listing skips it too).
  """
  directory = os.path.join(out, store.DONE_PREFIX)
  names = os.listdir(directory) if os.path.isdir(directory) else []
  return {n for n in names if _MARKER.fullmatch(n)}


@pytest.fixture(scope="module")
def single(setup):
  """The single-process result every multi-process run must equal."""
  out = str(setup[2] / "single.zarr")
  rc, stdout, stderr = _finish(*_start(setup, out))
  assert rc == 0, stderr[-3000:]
  keys = _segmented(stderr)
  assert len(keys) == len(set(keys)) == ALL_BLOCKS
  assert set(keys) == _markers(out)
  return _read(out), _read(out + ".probs"), set(keys)


def test_two_processes_equal_one_and_share_the_blocks(setup, single):
  labels, probs, all_keys = single
  out = str(setup[2] / "two.zarr")
  runs = [_finish(*p) for p in _two_processes(setup, out)]
  assert [rc for rc, _, _ in runs] == [0, 0], [err[-2000:] for _, _, err in runs]
  shares = [set(_segmented(err)) for _, _, err in runs]
  assert [len(s) for s in shares] == [ALL_BLOCKS // 2] * 2
  assert not shares[0] & shares[1]  # no block done twice
  assert shares[0] | shares[1] == all_keys == _markers(out)  # none skipped
  for pid, (_, stdout, _) in enumerate(runs):
    assert f"process {pid} of 2: segmented {ALL_BLOCKS // 2} of its {ALL_BLOCKS // 2}" in stdout
  np.testing.assert_array_equal(_read(out), labels)
  np.testing.assert_array_equal(_read(out + ".probs"), probs)
  assert int(labels.max()) < len(CLASSES) and len(np.unique(labels)) > 1


def test_a_killed_process_is_finished_by_rerunning_the_command(setup, single):
  labels, probs, all_keys = single
  out = str(setup[2] / "killed.zarr")
  procs = _two_processes(setup, out)
  # Kill process 0 (it also hosts the coordinator) once it has finished a block.
  victim, _ = procs[0]
  share = set(infer.assign_blocks(infer.plan_blocks(SHAPE, BLOCK), 0, 2))
  share = {b.key for b in share}
  deadline = time.time() + 120
  while not _markers(out) & share and time.time() < deadline and victim.poll() is None:
    time.sleep(0.002)
  victim.send_signal(signal.SIGKILL)
  # Without its coordinator JAX ends process 1 too; a job scheduler would do the same.
  for proc, logs in procs:
    _finish(proc, logs, timeout=60)
  done = _markers(out)
  assert done & share, "process 0 finished no block before it was killed"
  assert not share <= done, "process 0 finished its blocks before it was killed"
  assert done < all_keys

  reruns = [_finish(*p) for p in _two_processes(setup, out)]
  assert [rc for rc, _, _ in reruns] == [0, 0], [err[-2000:] for _, _, err in reruns]
  shares = [set(_segmented(err)) for _, _, err in reruns]
  assert not shares[0] & shares[1]
  assert not (shares[0] | shares[1]) & done  # no block marked done is redone
  assert shares[0] | shares[1] | done == all_keys == _markers(out)  # none skipped
  assert "resumed:" in reruns[0][1]
  np.testing.assert_array_equal(_read(out), labels)
  np.testing.assert_array_equal(_read(out + ".probs"), probs)
