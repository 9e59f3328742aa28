"""The README, executed: its shell and Python blocks run as written, on a tiny stack.

Every ```bash and ```python block runs in order in one temporary directory (with the
checkout's experiments/ linked in, as the README's commands run from a checkout), after
the sizes in `REWRITES` are made small: the README's own `fibseg make-synthetic` makes a
24 x 64 x 64 stack, and training takes two steps of a tiny network. A block that cannot
run here is preceded in the README by `<!-- readme-test: skip (reason) -->`.

The pages moved out of the README (docs/*.md) are held to the same words: every `fibseg`
command there and in the README names a real subcommand and only flags (and
--config.FIELD) it has, and their skip markers give reasons.
"""

import dataclasses
import glob
import importlib
import os
import re
import shutil
import subprocess
import sys
import uuid

import jax
import ml_collections
import numpy as np
import pytest

from fibseg_jax import checkpoint, infer, models
from fibseg_jax.cli import main as cli_main
from fibseg_jax.data import volume
from fibseg_jax.infer import segment
from fibseg_jax.train import config as config_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = os.path.join(REPO, "README.md")
DOCS = sorted(glob.glob(os.path.join(REPO, "docs", "*.md")))
# A newcomer reads the README in ten minutes: the product path, then links to docs/.
MAX_README_LINES = 260
SKIP = re.compile(r"<!--\s*readme-test:\s*skip\s*\((?P<reason>[^)]+)\)\s*-->")
FENCE = re.compile(r"^```(?P<lang>\w*)\n(?P<code>.*?)^```$", re.M | re.S)

# A network and budget that train in seconds on 2 cores (the test_demo.py sizes).
TINY_TRAIN = (
  "--config.train.eval_every=1 --config.data.val_block=32 --config.model.depth=2 "
  "'--config.model.features=(4,8,8)' --progress=false"
)
# (pattern, replacement) applied to every command; each must match at least once, so a
# README change cannot silently run a full-size job here.
REWRITES = (
  # The README's half widths give way to the tiny network (a tuple flag given twice joins).
  (r" '--config\.model\.features=\([\d,]+\)'", ""),
  (r"--shape=\S+", "--shape=24,64,64"),
  (r"--config\.data\.patch=\d+", "--config.data.patch=32"),
  (r"--config\.train\.batch_size=\d+", "--config.train.batch_size=2"),
  (r"--config\.train\.steps=\d+", "--config.train.steps=2 " + TINY_TRAIN),
  (r"^(fibseg segment .*)$", r"\1 --notta --overlap=16"),
)
# What the From Python snippet must have computed, appended to it.
PYTHON_CHECKS = """
assert labels.shape == vol.shape[1:] and labels.dtype == np.uint8, labels.shape
assert probabilities.shape == (*vol.shape[1:], len(restored.classes)), probabilities.shape
np.testing.assert_allclose(probabilities.sum(-1), 1.0, atol=1e-4)
assert logits.shape == (1, y, x, len(restored.classes)), logits.shape
print("readme python checks passed")
"""
# Fewest blocks and commands the run must execute: it cannot pass by skipping them.
MIN_BASH_BLOCKS = 2
MIN_COMMANDS = 7
MIN_PYTHON_BLOCKS = 1
MAX_SKIPPED = 3


@dataclasses.dataclass
class Block:
  lang: str
  code: str
  line: int
  skip: str | None  # the reason, when marked to be skipped


def readme_blocks(text: str) -> list[Block]:
  """The fenced blocks of a markdown text, each with the skip marker right before it."""
  blocks = []
  for match in FENCE.finditer(text):
    before = text[: match.start()].rstrip().splitlines()
    marker = SKIP.fullmatch(before[-1].strip()) if before else None
    line = text.count("\n", 0, match.start()) + 1
    code = match.group("code")
    blocks.append(Block(match.group("lang"), code, line, marker and marker.group("reason")))
  return blocks


def shell_commands(code: str) -> list[str]:
  """A bash block's commands: continuation lines joined, comments and blank lines dropped."""
  joined = re.sub(r"\\\n\s*", " ", code)
  return [c.strip() for c in joined.splitlines() if c.strip() and not c.lstrip().startswith("#")]


def rewrite(command: str, counts: dict[str, int]) -> str:
  for pattern, replacement in REWRITES:
    command, n = re.subn(pattern, replacement, command, flags=re.M)
    counts[pattern] += n
  return command


def _env() -> dict[str, str]:
  env = dict(os.environ)
  env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")
  env["PYTHONUNBUFFERED"] = "1"
  return env


def _run(command: list[str], cwd, env) -> subprocess.CompletedProcess:
  return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


def test_readme_runs_as_written(tmp_path):
  env = _env()
  fibseg = shutil.which("fibseg", path=env["PATH"])
  assert fibseg and os.path.dirname(fibseg) == os.path.dirname(sys.executable), (
    f"`fibseg` is not installed next to {sys.executable}: `pip install -e .` (make test does)"
  )
  with open(README) as f:
    blocks = readme_blocks(f.read())
  os.symlink(os.path.join(REPO, "experiments"), tmp_path / "experiments")
  counts = {pattern: 0 for pattern, _ in REWRITES}
  ran = {"bash": 0, "python": 0, "commands": 0}
  skipped = []
  for number, block in enumerate(blocks):
    if block.skip:
      skipped.append(block)
      continue
    if block.lang == "bash":
      for command in shell_commands(block.code):
        command = rewrite(command, counts)
        done = _run(["bash", "-c", command], tmp_path, env)
        assert done.returncode == 0, (
          f"README line {block.line}: {command}\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
        )
        ran["commands"] += 1
      ran["bash"] += 1
    elif block.lang == "python":
      script = tmp_path / f"readme_block_{number}.py"
      script.write_text(block.code + PYTHON_CHECKS)
      done = _run([sys.executable, str(script)], tmp_path, env)
      assert done.returncode == 0, f"README line {block.line}:\n{done.stdout}\n{done.stderr}"
      assert "readme python checks passed" in done.stdout
      # A healthy checkpoint loads without absl / orbax warnings that read like damage.
      warnings = [ln for ln in done.stderr.splitlines() if re.match(r"[WE]\d{4} |WARNING", ln)]
      assert not warnings, f"README line {block.line} printed warnings:\n" + "\n".join(warnings)
      ran["python"] += 1
  assert ran["bash"] >= MIN_BASH_BLOCKS and ran["commands"] >= MIN_COMMANDS, ran
  assert ran["python"] >= MIN_PYTHON_BLOCKS, ran
  assert len(skipped) <= MAX_SKIPPED, [b.line for b in skipped]
  assert not [p for p, n in counts.items() if n == 0], counts  # every size was made small
  for path in (
    "data/preview.png",
    "vol.zarr/zarr.json",
    "runs/unet/metrics.jsonl",
    "seg.zarr/zarr.json",
    "seg.ome.zarr/zarr.json",
    "unc.zarr/zarr.json",
    "report/report.md",
    "suggest/suggest.json",
  ):
    assert (tmp_path / path).exists(), path


def _read(path: str) -> str:
  with open(path) as f:
    return f.read()


@pytest.mark.parametrize("path", [README, *DOCS], ids=os.path.basename)
def test_skip_markers_sit_right_before_a_block_and_give_a_reason(path):
  text = _read(path)
  markers = SKIP.findall(text)
  assert len(markers) == sum(1 for b in readme_blocks(text) if b.skip)  # none is stray
  assert all(reason.strip() for reason in markers)
  assert len(re.findall(r"readme-test", text)) == len(markers)  # no misspelt marker


def test_readme_names_only_real_subcommands():
  text = _read(README)
  named = set(re.findall(r"\bfibseg ([a-z][a-z-]*)", text))
  assert {"ingest", "train", "segment", "evaluate", "suggest", "make-synthetic"} <= named
  for path in (README, *DOCS):
    named = set(re.findall(r"\bfibseg ([a-z][a-z-]*)", _read(path)))
    runs = set(cli_main.COMMANDS) | set(cli_main.HIDDEN)  # the first study commands run too
    unknown = named - runs - {"alone", "COMMAND"}
    assert not unknown, (os.path.basename(path), unknown)
    # The scripts work too, but the README and docs show the installed command.
    scripts = set(re.findall(r"python\s+experiments/(\w+)\.py", _read(path)))
    assert scripts <= {"COMMAND"}, scripts


def test_readme_is_the_product_path_and_links_the_moved_pages():
  text = _read(README)
  assert len(text.splitlines()) <= MAX_README_LINES
  headings = re.findall(r"^## (.+)$", text, re.M)
  path = ["Install", "Your stack", "1. Ingest", "2. Paint or strokes", "3. Train"]
  path += ["4. Segment", "5. Evaluate"]
  assert headings[: len(path)] == path, headings
  assert {"Slice numbers", "In napari", "Results"} <= set(headings)
  for page in ("docs/results.md", "docs/recipe.md", "docs/studies.md", "docs/layout.md"):
    assert f"]({page}" in text and os.path.exists(os.path.join(REPO, page)), page
  # Every relative link of the README and docs points at a file that exists.
  for doc in (README, *DOCS):
    for target in re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", _read(doc)):
      if "://" not in target:
        where = os.path.normpath(os.path.join(os.path.dirname(doc), target))
        assert os.path.exists(where), (os.path.basename(doc), target)


def _flags_of(module: str, seen: set[str] | None = None) -> set[str]:
  """The absl flags a subcommand's module defines, with those of the cli modules it imports."""
  seen = set() if seen is None else seen
  if module in seen:
    return set()
  seen.add(module)
  text = _read(os.path.join(REPO, *module.split(".")) + ".py")
  names = set(re.findall(r"DEFINE_\w+\(\s*\"(\w+)\"", text))
  if module == "fibseg_jax.cli.study":  # each study adds its own OPTIONS as flags
    from fibseg_jax.cli import study as study_cli  # noqa: PLC0415

    for study_module, _ in study_cli.STUDIES.values():
      study = importlib.import_module(f"fibseg_jax.study.{study_module}")
      names |= {option.name for option in getattr(study, "OPTIONS", ())}
  for imported in re.findall(r"^from fibseg_jax\.cli import ([\w, ]+)$", text, re.M):
    for name in imported.replace(" ", "").split(","):
      names |= _flags_of(f"fibseg_jax.cli.{name}", seen)
  return names


def _config_fields() -> set[str]:
  fields = set(config_lib.flat_fields(config_lib.base_config()))
  for name in models.MODELS:
    fields |= {f"model.{k}" for k in models.default_config(name)}
  return fields


def doc_commands(text: str) -> list[str]:
  """The `fibseg COMMAND ...` lines of a page: in its bash blocks and its inline code."""
  commands = []
  for block in readme_blocks(text):
    if block.lang == "bash":
      commands += [c for c in shell_commands(block.code) if c.startswith("fibseg ")]
  commands += re.findall(r"`(fibseg [a-z][^`]*)`", text)
  return commands


def test_readme_commands_use_real_flags():
  fields = _config_fields()
  absl = {"help", "helpfull", "verbosity"}
  checked = 0
  for path in (README, *DOCS):
    for command in doc_commands(_read(path)):
      name = command.split()[1]
      if name not in cli_main.COMMANDS:
        continue
      known = _flags_of(cli_main.COMMANDS[name][0]) | absl
      for flag in re.findall(r"(?<![\w-])--([\w.]+)", command):
        where = f"{os.path.basename(path)}: {command[:60]}... --{flag}"
        if flag.startswith("config."):
          assert "config" in known and flag.removeprefix("config.") in fields, where
        else:
          bool_off = flag.startswith("no") and flag[2:] in known
          assert flag in known or bool_off, where
        checked += 1
  assert checked >= 40, checked  # the check ran over the README's and docs' commands


def test_the_flag_check_can_fail():
  assert "eval_slices" not in _flags_of("fibseg_jax.cli.segment")
  assert {"labels_unlabelled", "classes"} <= _flags_of("fibseg_jax.cli.ingest")
  assert {"out", "budget", "seeds", "against"} <= _flags_of("fibseg_jax.cli.study")
  assert "against" not in _flags_of("fibseg_jax.cli.train")
  assert "train.init_lr_scale" in _config_fields() and "train.nope" not in _config_fields()


def _tiny_restored(classes=("pore", "solid", "grain"), channels=("ICE", "TLD")):
  config = config_lib.base_config()
  config.model.update(models.default_config("unet"))
  config.model.update(depth=2, features=(4, 8, 8), num_classes=len(classes))
  config.data.channels = ",".join(channels)
  config.data.classes = tuple(classes)
  model = models.build(config.model)
  x = np.zeros((1, config.data.slices, 16, 16, len(channels)), np.float32)
  variables = model.init(jax.random.PRNGKey(0), x, train=False)
  return checkpoint.Restored(
    model=model,
    variables=dict(variables),
    config=ml_collections.ConfigDict(config),
    step=0,
    path="tiny",
  )


def test_predict_slice_is_what_segment_writes():
  """predict_slice on one slice == that slice of segment_volume's output, same tiling."""
  restored = _tiny_restored()
  root = f"memory://readme-{uuid.uuid4().hex[:8]}"
  rng = np.random.default_rng(0)
  shape = (4, 37, 50)  # y, x not multiples of the model's 4, nor of the tile
  with volume.create_volume(
    root,
    shape=shape,
    dtype="uint16",
    channels=("ICE", "TLD"),
    classes=restored.classes,
    voxel_size_nm=(50, 25, 25),
    overwrite=True,
  ) as w:
    for z in range(shape[0]):
      w.write_slice(z, rng.integers(1000, 5000, (*shape[1:], 2)).astype(np.uint16))
    w.commit()
  vol = volume.open_volume(root, check_labels=False)
  labels, probabilities = infer.predict_slice(restored, vol, 0, tile=32, overlap=8, batch=4)
  assert labels.shape == shape[1:] and probabilities.shape == (*shape[1:], 3)
  np.testing.assert_allclose(probabilities.sum(-1), 1.0, atol=1e-5)
  out = f"memory://readme-seg-{uuid.uuid4().hex[:8]}"
  segment.segment_volume(
    vol,
    restored.model,
    restored.variables,
    channels=restored.channels,
    slices=restored.slices,
    classes=restored.classes,
    output=out,
    probabilities=out + "-probs",
    size_multiple=restored.size_multiple,
    settings=infer.SegmentSettings(tile=32, overlap=8, batch=4, progress=False),
  )
  written = infer.open_array(out)[0].read().result()
  np.testing.assert_array_equal(labels, written)
  written_probs = infer.open_array(out + "-probs")[0].read().result()
  np.testing.assert_allclose(probabilities * 255, written_probs, atol=0.51)
  assert len(np.unique(labels)) > 1  # an all-one-class answer would agree trivially
  with pytest.raises(infer.InferenceError, match="z=4"):
    infer.predict_slice(restored, vol, 4)
  with pytest.raises(infer.InferenceError, match="--tile=30"):
    infer.predict_slice(restored, vol, 0, tile=30)
