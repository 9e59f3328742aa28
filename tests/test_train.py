"""Training: data parallelism over devices and processes, checkpoints, resume, user mistakes."""

import os
import re
import signal
import socket
import subprocess
import sys
import time

import jax
import ml_collections
import numpy as np
import pytest

from fibseg_jax import checkpoint, outputs
from fibseg_jax.data import volume
from fibseg_jax.train import config as config_lib
from fibseg_jax.train import loop, metrics_writer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN = os.path.join(REPO, "experiments", "train.py")
UNET_CONFIG = os.path.join(REPO, "experiments", "configs", "unet.py")
CLASSES = ("pore", "solid", "grain")
# A tiny U-Net: 2 poolings, so patches are multiples of 4.
TINY_MODEL = {"name": "unet", "depth": 2, "features": (4, 8, 8), "norm": "batch"}
TINY_FLAGS = ["--config.model.depth=2", "--config.model.features=(4,8,8)"]


def make_volume(root, shape=(6, 48, 48), annotated=(1, 3, 4), seed=0):
  """A volume whose labels follow the image (three intensity bands), so a model can learn."""
  rng = np.random.default_rng(seed)
  z, y, x = shape
  with volume.create_volume(
    root,
    shape=shape,
    dtype="uint16",
    channels=("ICE", "TLD"),
    classes=CLASSES,
    voxel_size_nm=(50, 25, 25),
    overwrite=True,
  ) as w:
    for k in range(z):
      truth = rng.integers(0, 3, (y // 8, x // 8)).repeat(8, 0).repeat(8, 1).astype(np.uint8)
      ice = 1000 + 4000.0 * truth + rng.normal(0, 800, (y, x))
      tld = 3000 + 2000.0 * (truth == 2) + rng.normal(0, 500, (y, x))
      image = np.stack([ice, tld], -1).clip(0, 65535).astype(np.uint16)
      w.write_slice(k, image, truth if k in annotated else None)
    w.commit()
  return root


def tiny_config(path, **train):
  config = config_lib.base_config()
  config.model.update(TINY_MODEL)
  config.data.path = path
  config.data.patch = 16
  config.data.val_block = 16
  config.data.prefetch = 1
  config.train.batch_size = 4
  config.train.steps = 4
  config.train.eval_every = 2
  config.train.log_every = 1
  config.train.warmup_steps = 1
  config.train.update(train)
  return config


def _env(devices=1):
  env = dict(os.environ)
  env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
  env["JAX_PLATFORMS"] = "cpu"
  return env


def _losses(workdir):
  rows = metrics_writer.read_metrics(os.path.join(workdir, "metrics.jsonl"))
  return {r["step"]: r["loss"] for r in rows if "loss" in r}


def _train_cmd(path, workdir, *extra, steps=4):
  return [
    sys.executable,
    TRAIN,
    f"--config={UNET_CONFIG}",
    f"--workdir={workdir}",
    f"--config.data.path={path}",
    "--config.data.patch=16",
    "--config.data.val_block=16",
    "--config.model.norm=batch",
    "--config.train.batch_size=4",
    f"--config.train.steps={steps}",
    "--config.train.eval_every=2",
    "--config.train.log_every=1",
    "--config.train.warmup_steps=1",
    "--progress=false",
    *TINY_FLAGS,
    *extra,
  ]


STEPS = 6


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
  """One uninterrupted single-device run that the parallel and resumed runs must match."""
  root = tmp_path_factory.mktemp("reference")
  path = make_volume(str(root / "vol.zarr"))
  workdir = str(root / "run")
  done = subprocess.run(_train_cmd(path, workdir, steps=STEPS), env=_env(1), cwd=REPO, **_capture())
  assert done.returncode == 0, done.stderr[-3000:]
  assert "1 device(s) on 1 process(es)" in done.stdout
  return path, workdir


def _capture():
  return {"capture_output": True, "text": True, "check": False}


def test_four_devices_give_the_same_losses_as_one(reference, tmp_path):
  path, ref = reference
  workdir = str(tmp_path / "four")
  done = subprocess.run(_train_cmd(path, workdir, steps=STEPS), env=_env(4), cwd=REPO, **_capture())
  assert done.returncode == 0, done.stderr[-3000:]
  assert "4 device(s) on 1 process(es)" in done.stdout
  one, four = _losses(ref), _losses(workdir)
  assert sorted(one) == sorted(four) == list(range(1, STEPS + 1))
  np.testing.assert_allclose([four[s] for s in one], [one[s] for s in one], rtol=2e-4)
  assert one[1] != one[STEPS]  # the model trains: a frozen one would repeat its loss


def _free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def test_two_processes_agree_and_only_process_0_writes(reference, tmp_path):
  path, ref = reference
  port = _free_port()
  workdir = str(tmp_path / "multi")  # shared, as on a cluster file system
  procs = []
  for pid in range(2):
    cmd = _train_cmd(
      path,
      workdir,
      f"--coordinator_address=127.0.0.1:{port}",
      "--num_processes=2",
      f"--process_id={pid}",
      steps=STEPS,
    )
    procs.append(
      subprocess.Popen(
        cmd, env=_env(1), cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
      )
    )
  outs = [p.communicate(timeout=300) for p in procs]
  assert [p.returncode for p in procs] == [0, 0], [o[1][-2000:] for o in outs]
  assert "2 device(s) on 2 process(es)" in outs[0][0]
  assert "parameters" not in outs[1][0]  # only process 0 reports
  rows = metrics_writer.read_metrics(os.path.join(workdir, "metrics.jsonl"))
  assert [r["step"] for r in rows if "loss" in r] == list(range(1, STEPS + 1))  # written once
  assert len(os.listdir(os.path.join(workdir, "tb"))) == 1
  # Two processes with one device each see the same global batch as one device alone.
  multi, one = _losses(workdir), _losses(ref)
  np.testing.assert_allclose([multi[s] for s in one], [one[s] for s in one], rtol=2e-4)
  assert checkpoint.load(workdir, best=False).step == STEPS


def test_sigkill_mid_training_resumes_to_the_same_end(reference, tmp_path):
  path, ref = reference
  workdir = str(tmp_path / "killed")
  proc = subprocess.Popen(
    _train_cmd(path, workdir, steps=STEPS),
    env=_env(),
    cwd=REPO,
    stdout=subprocess.DEVNULL,
    stderr=subprocess.DEVNULL,
  )
  first = os.path.join(workdir, "checkpoints", "2")
  deadline = time.time() + 180
  while not os.path.isdir(first) and time.time() < deadline and proc.poll() is None:
    time.sleep(0.02)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  assert os.path.isdir(first), "no checkpoint appeared before the kill"
  steps_at_kill = checkpoint.manager(os.path.join(workdir, "checkpoints"), read_only=True)
  assert max(steps_at_kill.all_steps()) < STEPS, "killed too late to test resuming"

  done = subprocess.run(_train_cmd(path, workdir, steps=STEPS), env=_env(), cwd=REPO, **_capture())
  assert done.returncode == 0, done.stderr[-3000:]
  assert "resuming from step" in done.stdout
  resumed, one = _losses(workdir), _losses(ref)
  assert sorted(resumed) == list(range(1, STEPS + 1))  # no step twice, none missing
  np.testing.assert_allclose([resumed[s] for s in one], [one[s] for s in one], rtol=1e-5)
  a, b = checkpoint.load(workdir, best=False), checkpoint.load(ref, best=False)
  assert a.step == b.step == STEPS
  jax.tree.map(
    lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6), a.variables, b.variables
  )
  # A finished run restarted does nothing more and still ends at the same step.
  again = subprocess.run(_train_cmd(path, workdir, steps=STEPS), env=_env(), cwd=REPO, **_capture())
  assert again.returncode == 0 and f"done: step {STEPS}" in again.stdout


# Runs experiments/train.py with the batch of step 3 held back until the test has sent
# SIGINT: the signal then lands, deterministically, while step 3 is in progress. The
# save of step 3 gets a second Ctrl-C of its own.
_HELD_AT_STEP_3 = """
import os, runpy, signal, sys, time
from fibseg_jax import checkpoint, outputs
from fibseg_jax.data import loader
ready, go = sys.argv[1:3]
batches, save = loader.SlabLoader.batches, checkpoint.save
def held(self, start_step=0):
  for step, batch in enumerate(batches(self, start_step), start_step):
    if step == 2:
      open(ready, "w").close()
      deadline = time.time() + 120
      while not os.path.exists(go) and time.time() < deadline:
        time.sleep(0.01)
    yield batch
def interrupted_save(mngr, step, *args, **kwargs):
  if step == 3:
    signal.raise_signal(signal.SIGINT)
  save(mngr, step, *args, **kwargs)
loader.SlabLoader.batches, checkpoint.save = held, interrupted_save
sys.argv = sys.argv[3:]
"""
# experiments/train.py from sys.argv, catching KeyboardInterrupt as the command line does.
_RUN_AS_THE_CLI = """
try:
  runpy.run_path(sys.argv[0], run_name="__main__")
except KeyboardInterrupt as e:
  print(f"interrupted: {e}", file=sys.stderr)
  sys.exit(130)
"""
# Two Ctrl-C before step 1 is computed: the second stops at once.
_TWICE_AT_STEP_1 = """
import runpy, signal, sys
from fibseg_jax.data import loader
batches = loader.SlabLoader.batches
def twice(self, start_step=0):
  for batch in batches(self, start_step):
    signal.raise_signal(signal.SIGINT)
    signal.raise_signal(signal.SIGINT)
    yield batch
loader.SlabLoader.batches = twice
sys.argv = sys.argv[1:]
"""


def test_ctrl_c_saves_the_current_step_and_the_rerun_resumes_exactly(reference, tmp_path):
  path, ref = reference
  workdir = str(tmp_path / "interrupted")
  ready, go = str(tmp_path / "ready"), str(tmp_path / "go")
  cmd = _train_cmd(path, workdir, steps=STEPS)
  proc = subprocess.Popen(
    [sys.executable, "-c", _HELD_AT_STEP_3 + _RUN_AS_THE_CLI, ready, go, *cmd[1:]],
    env=_env(),
    cwd=REPO,
    stdout=subprocess.PIPE,
    stderr=subprocess.PIPE,
    text=True,
  )
  deadline = time.time() + 180
  while not os.path.exists(ready) and time.time() < deadline and proc.poll() is None:
    time.sleep(0.02)
  assert os.path.exists(ready), proc.communicate()[1][-3000:]
  proc.send_signal(signal.SIGINT)
  open(go, "w").close()
  _, stderr = proc.communicate(timeout=180)
  assert proc.returncode == 130, stderr[-3000:]
  assert "Traceback" not in stderr
  assert "Ctrl-C: writing the checkpoint; stopping once it is complete" in stderr
  assert stderr.strip().splitlines()[-1] == (
    f"interrupted: stopped at step 3: checkpoint saved in {workdir}; rerun the same command "
    "to resume"
  )
  # Step 3 was finished and saved although --config.train.eval_every=2 saves at 2, 4, 6.
  mngr = checkpoint.manager(os.path.join(workdir, "checkpoints"), read_only=True)
  assert mngr.all_steps() == [2, 3]
  rows = metrics_writer.read_metrics(os.path.join(workdir, "metrics.jsonl"))
  assert max(r["step"] for r in rows) == 3
  assert os.path.exists(os.path.join(workdir, "training_curves.png"))

  done = subprocess.run(cmd, env=_env(), cwd=REPO, **_capture())
  assert done.returncode == 0, done.stderr[-3000:]
  assert "resuming from step 3" in done.stdout
  assert not [line for line in done.stderr.splitlines() if line.startswith("W")]  # no orbax
  resumed, one = _losses(workdir), _losses(ref)
  assert sorted(resumed) == list(range(1, STEPS + 1))
  np.testing.assert_allclose([resumed[s] for s in one], [one[s] for s in one], rtol=1e-5)
  a, b = checkpoint.load(workdir, best=False), checkpoint.load(ref, best=False)
  assert a.step == b.step == STEPS
  jax.tree.map(
    lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6), a.variables, b.variables
  )


def test_a_second_ctrl_c_during_a_step_stops_at_once_without_saving(tmp_path):
  path = make_volume(str(tmp_path / "vol.zarr"))
  workdir = str(tmp_path / "run")
  done = subprocess.run(
    [sys.executable, "-c", _TWICE_AT_STEP_1 + _RUN_AS_THE_CLI, *_train_cmd(path, workdir)[1:]],
    env=_env(),
    cwd=REPO,
    **_capture(),
  )
  assert done.returncode == 130 and "Traceback" not in done.stderr, done.stderr[-3000:]
  assert done.stderr.strip().splitlines()[-1] == (
    "interrupted: stopped during step 1, without saving it; rerun the same command to "
    "resume from the start"
  )
  assert not os.path.exists(os.path.join(workdir, "checkpoints", "1"))


def test_checkpoint_load_predicts_and_outputs(tmp_path, capsys):
  path = make_volume(str(tmp_path / "vol.zarr"))
  workdir = str(tmp_path / "run")
  summary = loop.train_and_evaluate(tiny_config(path), workdir, progress=False)
  assert summary["step"] == 4
  restored = checkpoint.load(workdir)
  assert restored.channels == ("ICE", "TLD") and restored.slices == 3
  assert restored.classes == CLASSES and restored.size_multiple == 4
  assert restored.step in (2, 4)
  x = np.zeros((2, 3, 16, 16, 2), np.float32)
  logits = restored.model.apply(restored.variables, x, train=False)
  assert logits.shape == (2, 16, 16, 3)
  rows = metrics_writer.read_metrics(os.path.join(workdir, "metrics.jsonl"))
  val = [r for r in rows if "val_miou" in r]
  assert [r["step"] for r in val] == [2, 4]
  assert all(0 <= r["val_miou"] <= 1 for r in val)
  assert {f"val_iou/{c}" for c in CLASSES} <= set(val[0])
  assert os.path.exists(os.path.join(workdir, "training_curves.png"))
  assert any(f.startswith("events") for f in os.listdir(os.path.join(workdir, "tb")))
  # One step directory, loaded directly.
  step_dir = os.path.join(workdir, "checkpoints", "4")
  assert checkpoint.load(step_dir).step == 4
  # Fine-tuning starts from the saved weights: with a zero learning rate they stay put.
  tuned = str(tmp_path / "tuned")
  config = tiny_config(path, steps=2, learning_rate=0.0, init_from=workdir)
  capsys.readouterr()
  loop.train_and_evaluate(config, tuned, progress=False)
  said = capsys.readouterr().out
  assert "starting from scratch" not in said  # it says what it does, once
  assert re.search(
    rf"fine-tuning: starting from the weights of {re.escape(workdir)}\S* \(step [24]\) with "
    r"a fresh optimizer; learning rate warming up over 1 step to a peak of 0 "
    r"\(--config.train.learning_rate=0 x --config.train.init_lr_scale=1\)",
    said,
  ), said
  assert f"parameters; 1 device(s) on 1 process(es); fine-tuning the weights of {workdir}" in said
  # Where it starts is scored and kept as checkpoint 0: the best is never worse than that.
  start = metrics_writer.read_metrics(os.path.join(tuned, "metrics.jsonl"))[0]
  source_best = max(r["val_miou"] for r in val)
  assert start["step"] == 0 and start["val_miou"] == pytest.approx(source_best, abs=1e-6)
  assert "step 0 (the weights it starts from): validation mean IoU" in said
  assert 0 in checkpoint.manager(os.path.join(tuned, "checkpoints"), read_only=True).all_steps()
  jax.tree.map(
    np.testing.assert_array_equal,
    checkpoint.load(tuned, best=False).variables["params"],
    restored.variables["params"],
  )
  wrong = tiny_config(path, steps=2, init_from=workdir)
  wrong.model.features = (4, 8, 16)
  with pytest.raises(loop.ConfigError, match=r"init_from=.*its model differs in \['features'\]"):
    loop.train_and_evaluate(wrong, str(tmp_path / "wrong"), progress=False)
  # The workdir refuses a different experiment before anything is compiled.
  other = tiny_config(path)
  other.data.channels = "ICE"
  with pytest.raises(loop.ConfigError, match="holds checkpoints .* of a different experiment"):
    loop.train_and_evaluate(other, workdir, progress=False)


def _check_resume(workdir, config, **changes):
  for key, value in changes.items():
    section, field = key.split("__")
    config[section][field] = value
  return loop.check_workdir(loop.prepare(config).settings, workdir)


def test_resume_refuses_another_volume_channels_slices_or_model(tmp_path):
  path = make_volume(str(tmp_path / "vol.zarr"))
  workdir = str(tmp_path / "run")
  # The config as training saves it (checked and filled in); only the config is read.
  mngr = checkpoint.manager(os.path.join(workdir, "checkpoints"))
  state = {"params": {"w": np.zeros(1, np.float32)}}
  checkpoint.save(mngr, 2, state, loop.prepare(tiny_config(path)).config, {"step": 2})
  mngr.wait_until_finished()
  assert _check_resume(workdir, tiny_config(path)) == 2
  # The same experiment spelled differently resumes: a relative path, spaces, a model
  # field set to its default.
  same = tiny_config(os.path.relpath(path))
  same.data.channels = "ICE, TLD"
  same.model.dropout = 0.0
  assert _check_resume(workdir, same) == 2
  other = make_volume(str(tmp_path / "other.zarr"), seed=1)
  for change, message in [
    ({"data__path": other}, re.escape(f"--config.data.path={path} there, {other} now")),
    ({"data__channels": "TLD,ICE"}, r"--config.data.channels=ICE,TLD there, TLD,ICE now"),
    ({"data__slices": 1}, r"--config.data.slices=3 there, 1 now"),
    ({"model__features": (4, 8, 16)}, r"model.features=\[4, 8, 8\] there, \[4, 8, 16\] now"),
    ({"model__norm": "instance"}, r"--config.model.norm=batch there, instance now"),
  ]:
    with pytest.raises(loop.ConfigError, match=message) as caught:
      _check_resume(workdir, tiny_config(path), **change)
    assert f"--workdir={workdir} holds checkpoints (step 2)" in str(caught.value)
    assert f"--config.train.init_from={workdir}" in str(caught.value)
    assert str(caught.value).count(" there, ") == 1  # only what differs is named
  # Another model altogether is named once, not field by field.
  with pytest.raises(loop.ConfigError, match=r"model.name=unet there, sensor3d now\. Resume"):
    _check_resume(workdir, tiny_config(path), model__name="sensor3d", model__norm="instance")


def test_load_refuses_a_directory_that_is_not_a_checkpoint(tmp_path):
  (tmp_path / "notes").mkdir()
  with pytest.raises(checkpoint.CheckpointError, match="is not a checkpoint"):
    checkpoint.load(str(tmp_path / "notes"))
  with pytest.raises(checkpoint.CheckpointError, match="no such checkpoint"):
    checkpoint.load(str(tmp_path / "missing"))


@pytest.mark.parametrize(
  "change, message",
  [
    ({"data.channels": "ICE,BSE"}, r"--config.data.channels: channel\(s\) \['BSE'\] not in"),
    ({"data.slices": 4}, r"even|odd"),
    ({"data.patch": 18}, r"multiple of 4"),
    ({"data.patch": 64}, r"--config.data.patch=64"),
    ({"model.num_classes": 5}, r"--config.model.num_classes=5 but volume .* has 3 classes"),
    ({"data.path": ""}, r"--config.data.path is required"),
    ({"data.eval_slices": "1,3,4"}, r"no annotated slices"),
    (
      {"data.eval_slices": "3,2"},
      r"^--config.data.eval_slices=3,2: slice 2 has no labels; annotated slices are 1, 3, 4$",
    ),
    ({"data.eval_slices": "0,5"}, r"^--config.data.eval_slices=0,5: slices 0, 5 have no labels;"),
  ],
)
def test_user_mistakes_caught_before_compiling(tmp_path, change, message):
  path = make_volume(f"memory://mistakes_{abs(hash(str(change)))}")
  config = tiny_config(path)
  for key, value in change.items():
    section, field = key.split(".")
    config[section][field] = value
  with pytest.raises(loop.ConfigError, match=message):  # all in prepare, nothing read yet
    loop.prepare(config)


def test_bad_flags_give_one_line_errors(tmp_path):
  path = make_volume(str(tmp_path / "vol.zarr"))
  cmd = _train_cmd(path, str(tmp_path / "run"), "--config.data.channels=ICE,XYZ")
  done = subprocess.run(cmd, env=_env(), cwd=REPO, **_capture())
  assert done.returncode != 0
  assert "--config.data.channels" in done.stderr and "XYZ" in done.stderr
  assert "Traceback" not in done.stderr
  assert not os.path.exists(tmp_path / "run" / "checkpoints")
  cmd = _train_cmd(path, str(tmp_path / "run"), "--config.train.batch_size=6")
  done = subprocess.run(cmd, env=_env(4), cwd=REPO, **_capture())
  assert done.returncode != 0
  assert "--config.train.batch_size=6 must be a positive multiple of the device count (4" in (
    done.stderr
  )


def test_resume_mismatch_and_flag_mistakes_are_one_line_but_bugs_keep_tracebacks(
  reference, tmp_path
):
  path, ref = reference
  done = subprocess.run(
    _train_cmd(path, ref, "--config.data.slices=1", steps=STEPS), env=_env(), cwd=REPO, **_capture()
  )
  assert done.returncode == 1 and "Traceback" not in done.stderr
  line = done.stderr.strip().splitlines()[-1]  # after orbax's read-only warnings
  assert line.startswith(f"error: --workdir={ref} holds checkpoints (step {STEPS})")
  assert "--config.data.slices=3 there, 1 now" in line
  cmd = _train_cmd(path, ref, "--num_processes=2", "--process_id=0", steps=STEPS)
  done = subprocess.run(cmd, env=_env(), cwd=REPO, **_capture())
  assert done.returncode == 1 and "Traceback" not in done.stderr
  assert "--coordinator_address, --num_processes and --process_id must be given together" in (
    done.stderr
  )
  # A ValueError that is not a user mistake is a bug: it is not dressed as one.
  bug = (
    "import runpy, sys\n"
    "from fibseg_jax.train import loop\n"
    "def train_and_evaluate(*args, **kwargs):\n"
    "  raise ValueError('operands could not be broadcast')\n"
    "loop.train_and_evaluate = train_and_evaluate\n"
    "sys.argv = sys.argv[1:]\n"
    "runpy.run_path(sys.argv[0], run_name='__main__')\n"
  )
  cmd = [sys.executable, "-c", bug, *_train_cmd(path, str(tmp_path / "bug"))[1:]]
  done = subprocess.run(cmd, env=_env(), cwd=REPO, **_capture())
  assert done.returncode == 1
  assert "Traceback" in done.stderr and "error: operands" not in done.stderr
  assert done.stderr.strip().endswith("ValueError: operands could not be broadcast")


def test_config_parsers():
  assert config_lib.parse_ints("3, 7", "--x") == (3, 7)
  assert config_lib.parse_ints("", "--x") == ()
  assert config_lib.parse_names("ICE,TLD", "--c") == ("ICE", "TLD")
  with pytest.raises(ValueError, match="--x=a: expected comma-separated integers"):
    config_lib.parse_ints("a", "--x")
  assert isinstance(config_lib.base_config(), ml_collections.ConfigDict)


def test_restored_channels_from_a_string_or_a_list():
  # A config file may give the channels as a tuple; the checkpoint's JSON holds a list.
  for channels in ("ICE, TLD", ["ICE", "TLD"]):
    config = ml_collections.ConfigDict({"data": {"channels": channels}})
    restored = checkpoint.Restored(model=None, variables={}, config=config, step=0, path="")
    assert restored.channels == ("ICE", "TLD")


def test_workdir_is_claimed_like_every_output(tmp_path):
  path = make_volume(str(tmp_path / "vol.zarr"))
  # A folder of raw data: refused in one line naming --workdir, nothing written there.
  raw = tmp_path / "raw"
  (raw / "ICE").mkdir(parents=True)
  (raw / "ICE" / "slice_0001.tif").write_bytes(b"not really a tiff")
  before = sorted(str(p) for p in raw.rglob("*"))
  with pytest.raises(loop.ConfigError) as caught:
    loop.train_and_evaluate(tiny_config(path), str(raw), progress=False)
  message = str(caught.value)
  assert message.startswith(f"--workdir={raw} exists and is a directory that is not a training ")
  assert "\n" not in message and "new or empty folder" in message
  assert sorted(str(p) for p in raw.rglob("*")) == before
  # A file, the volume itself, and a folder holding it are refused too.
  (tmp_path / "notes.txt").write_text("mine")
  for workdir, expected in (
    (tmp_path / "notes.txt", r"exists and is a file that is not a training run"),
    (tmp_path / "vol.zarr", r"is the input --config.data.path"),
    (tmp_path, r"contains the input --config.data.path"),
  ):
    with pytest.raises(loop.ConfigError, match=f"^--workdir={re.escape(str(workdir))}.*{expected}"):
      loop.claim_workdir(loop.prepare(tiny_config(path)).settings, str(workdir))
  assert (tmp_path / "notes.txt").read_text() == "mine"
  # The distillation teacher is written only into a claimed workdir.
  from fibseg_jax.infer import distill  # noqa: PLC0415 - infer is above train

  forest = tiny_config(path)
  forest.distill.teacher = "forest"
  with pytest.raises(loop.ConfigError, match=f"^--workdir={re.escape(str(raw))} exists"):
    distill.prepare_teacher(forest, str(raw), progress=False)
  assert sorted(str(p) for p in raw.rglob("*")) == before
  # A new folder (its parents made) is claimed and marked; an earlier run, marked or
  # written before markers (checkpoints/ only), is taken again.
  fresh = tmp_path / "runs" / "new"
  loop.claim_workdir(loop.prepare(tiny_config(path)).settings, str(fresh))
  assert outputs.marker_kind(fresh) == loop.WORKDIR_KIND
  loop.claim_workdir(loop.prepare(tiny_config(path)).settings, str(fresh))
  old = tmp_path / "old"
  (old / "checkpoints").mkdir(parents=True)
  loop.claim_workdir(loop.prepare(tiny_config(path)).settings, str(old))
  assert outputs.marker_kind(old) == loop.WORKDIR_KIND
