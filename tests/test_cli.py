"""The `fibseg` command: subcommands, help, one-line mistakes, Ctrl-C and --show_config."""

import ast
import configparser
import glob
import importlib.metadata
import importlib.util
import os
import re
import subprocess
import sys

import pytest

from fibseg_jax.cli import config_args, runner
from fibseg_jax.cli import main as cli_main
from fibseg_jax.train import config as config_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = sorted(glob.glob(os.path.join(REPO, "experiments", "configs", "*.py")))
UNET = os.path.join("experiments", "configs", "unet.py")


def fibseg(*args, cwd=REPO, **kwargs):
  """`python -m fibseg_jax.cli ARGS` (the installed script runs the same `run`)."""
  return subprocess.run(
    [sys.executable, "-m", "fibseg_jax.cli", *args],
    cwd=cwd,
    capture_output=True,
    text=True,
    timeout=300,
    **kwargs,
  )


def load_config(path):
  spec = importlib.util.spec_from_file_location("config_under_test", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def test_help_lists_every_subcommand_in_one_line():
  done = fibseg("--help")
  assert done.returncode == 0, done.stderr
  lines = done.stdout.splitlines()
  for name, (_, summary) in cli_main.COMMANDS.items():
    assert [ln for ln in lines if ln.split()[:1] == [name]] == [f"  {name:<14}  {summary}"]
  for required in ("ingest", "train", "segment", "evaluate", "suggest", "study", "bench"):
    assert required in cli_main.COMMANDS
  assert "sweep" in cli_main.HIDDEN  # fibseg sweep: now fibseg study sweep
  bare = fibseg()  # no command: the same usage, and no failure
  assert bare.returncode == cli_main.NO_COMMAND_EXIT == 0 and bare.stdout == done.stdout
  product, research = done.stdout.split("\nresearch:\n")
  assert all(f"  {name} " in product for name in cli_main.PRODUCT)
  assert all(f"  {name} " in research for name in cli_main.RESEARCH)
  assert all(f"  {name} " not in done.stdout for name in cli_main.HIDDEN)  # run, unlisted


@pytest.mark.parametrize("command", ["ingest", "study", "ablation", "bench"])
def test_subcommand_help_exits_zero(command):
  done = fibseg(command, "--help")
  assert done.returncode == 0, done.stderr
  assert "--out" in done.stdout or "studies:" in done.stdout


def test_unknown_subcommand_is_one_line_with_a_hint():
  done = fibseg("trian", "--workdir=x")
  assert done.returncode == 2
  assert done.stderr == "error: unknown command 'trian'; did you mean 'fibseg train'?\n"
  done = fibseg("xyzzy")
  assert done.stderr == "error: unknown command 'xyzzy'; fibseg --help lists them\n"


def test_console_script_is_declared_and_installed():
  setup = configparser.ConfigParser()
  setup.read(os.path.join(REPO, "setup.cfg"))
  declared = setup["options.entry_points"]["console_scripts"].strip()
  assert declared == "fibseg = fibseg_jax.cli.main:run"
  installed = importlib.metadata.entry_points(group="console_scripts", name="fibseg")
  assert [e.value for e in installed] == ["fibseg_jax.cli.main:run"], (
    "reinstall the package (pip install -e .) to get the fibseg command"
  )
  script = os.path.join(os.path.dirname(sys.executable), "fibseg")
  done = subprocess.run([script, "--version"], capture_output=True, text=True, timeout=60)
  assert done.returncode == 0 and done.stdout.startswith("fibseg ")


def _functions(path):
  with open(path) as f:
    tree = ast.parse(f.read())
  return {n.name for n in tree.body if isinstance(n, ast.FunctionDef)}


@pytest.mark.parametrize("name", list(cli_main.COMMANDS))
def test_each_subcommand_has_its_module_and_a_thin_script(name):
  module = cli_main.COMMANDS[name][0]
  path = os.path.join(REPO, *module.split(".")) + ".py"
  assert {"main", "run"} <= _functions(path)
  # experiments/<module>.py: only the import and the call, so the logic lives in one place.
  script = os.path.join(REPO, "experiments", module.rsplit(".", 1)[1] + ".py")
  with open(script) as f:
    code = [ln for ln in f.read().splitlines() if ln.strip() and not ln.startswith('"""')]
  short = module.rsplit(".", 1)[1]
  assert code == [
    f"from fibseg_jax.cli import {short}",
    'if __name__ == "__main__":',
    f"  {short}.run()",
  ]


def test_subcommand_help_shows_its_own_flags_and_no_other_subcommands():
  done = fibseg("ingest", "--helpfull")
  assert "Turns folders of per-slice detector images" in done.stdout
  assert "--channel:" in done.stdout and "--voxel_size_nm:" in done.stdout
  assert "--workdir" not in done.stdout  # train's flags are not even defined
  script = subprocess.run(
    [sys.executable, os.path.join("experiments", "train.py"), "--help"],
    cwd=REPO,
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert "--show_config" in script.stdout and "--workdir:" in script.stdout
  assert "fibseg train --config=unet --show_config" in script.stdout


def test_main_is_guarded_against_ctrl_c(capsys):
  def stopped(argv):
    raise KeyboardInterrupt("stopped at step 3: checkpoint saved in w; rerun to resume")

  with pytest.raises(SystemExit) as exit_info:
    runner.guarded(stopped)(["fibseg train"])
  assert exit_info.value.code == 130
  assert capsys.readouterr().err == (
    "interrupted: stopped at step 3: checkpoint saved in w; rerun to resume\n"
  )

  def bare(argv):
    raise KeyboardInterrupt

  with pytest.raises(SystemExit):
    runner.guarded(bare)(["fibseg train"])
  assert capsys.readouterr().err == "interrupted\n"


def test_ctrl_c_in_a_subcommand_is_one_line_and_status_130():
  code = (
    "import sys\n"
    "from fibseg_jax.cli import suggest\n"
    "def main(argv):\n"
    "  raise KeyboardInterrupt(sys.argv[1])\n"
    "suggest.main = main\n"
    "from fibseg_jax.cli.main import run\n"
    "run(['fibseg', 'suggest', '--out=x'])\n"
  )
  message = "stopped at step 7: checkpoint saved in runs/x; rerun the same command to resume"
  done = subprocess.run(
    [sys.executable, "-c", code, message], capture_output=True, text=True, timeout=300
  )
  assert done.returncode == 130
  assert done.stderr == f"interrupted: {message}\n"


@pytest.mark.parametrize(
  "args, line",
  [
    (
      [f"--config={UNET}", "--config.train.stepz=5"],
      "error: --config.train.stepz: no such config field; did you mean --config.train.steps?",
    ),
    (
      ["--config=nope.py"],
      "error: --config=nope.py: no such file; give a config by name (sensor3d, unet) or a "
      "file with a get_config()",
    ),
    (
      [f"--config={UNET}", "--config.train.steps=abc"],
      "error: --config.train.steps=abc: expected an integer (the default is 2000)",
    ),
    (
      [f"--config={UNET}", "--config.data.augment=maybe"],
      "error: --config.data.augment=maybe: expected true or false (the default is true)",
    ),
    ([f"--config={UNET}", "--tile=3"], "error: Unknown command line flag 'tile'"),
  ],
)
def test_config_mistakes_are_one_line(args, line):
  done = fibseg("train", "--workdir=runs/never", *args)
  assert done.returncode == 2, done.stderr
  assert done.stderr.splitlines() == [line]
  assert not os.path.exists(os.path.join(REPO, "runs", "never"))


def test_config_args_checks_without_a_subprocess(tmp_path):
  assert config_args.check_args(["--workdir=w"]) is None  # no --config: main says so
  config = config_args.check_args(["--config", UNET, "--config.model.features=(4,8,8)"])
  assert config.model.name == "unet"
  assert config_args.check_args([f"--config={UNET}", "--noconfig.data.augment"])
  with pytest.raises(config_args.ConfigArgError, match="did you mean --config.model.depth"):
    config_args.check_args([f"--config={UNET}", "--config.model.dpth=2"])
  with pytest.raises(config_args.ConfigArgError, match="expected a number"):
    config_args.check_args([f"--config={UNET}", "--config.train.learning_rate=fast"])
  broken = tmp_path / "broken.py"
  broken.write_text("x = 1\n")
  with pytest.raises(config_args.ConfigArgError, match="defines no get_config"):
    config_args.check_args([f"--config={broken}"])
  assert config_args.format_value((8, 8, 16)) == "(8,8,16)"
  assert config_args.format_value((5,)) == "(5,)"
  assert config_args.format_value("") == "''" and config_args.format_value(False) == "false"


def test_show_config_prints_every_field_with_its_value_and_help():
  done = fibseg("train", f"--config={UNET}", "--show_config", "--config.train.steps=5")
  assert done.returncode == 0, done.stderr
  rows = {ln.split()[0]: ln for ln in done.stdout.splitlines()}
  config = load_config(os.path.join(REPO, UNET))
  helps = config_lib.field_help(config)
  assert set(rows) == set(config_lib.flat_fields(config))
  for name, text in helps.items():
    assert rows[name].endswith(text), rows[name]
  assert re.match(r"train\.steps +5 \(file: 2000\) +training steps", rows["train.steps"])
  assert re.match(r"train\.eval_every +200 +validation", rows["train.eval_every"])
  assert re.match(r"model\.features +\(32,32,64,128,256,32\) +widths", rows["model.features"])


@pytest.mark.parametrize("path", [None, *CONFIGS], ids=lambda p: p and os.path.basename(p))
def test_every_config_field_has_one_line_of_help(path):
  config = config_lib.base_config() if path is None else load_config(path)
  helps = config_lib.field_help(config)
  assert set(helps) == set(config_lib.flat_fields(config))
  missing = [name for name, text in helps.items() if not text.strip()]
  assert not missing, f"no help line for {missing}: add them to config.FIELDS"
  assert all("\n" not in text for text in helps.values())
  if path is None:  # no help for a field that no longer exists
    assert set(config_lib.HELP) == set(helps)


def test_base_config_is_built_from_fields():
  config = config_lib.base_config()
  assert [name for name, _, _ in config_lib.FIELDS] == list(config_lib.HELP)
  flat = config_lib.flat_fields(config)
  for name, default, _ in config_lib.FIELDS:
    assert flat[name] == default and type(flat[name]) is type(default), name
  assert config.train.eval_every == 200 and config.data.classes == ()
