"""The modules of fibseg_jax/data import each other without a circle.

Every import counts, those under `if TYPE_CHECKING:` and inside functions too: a circle
of annotations is still a circle a reader has to follow.
"""

import ast
import pathlib
import subprocess
import sys

import pytest

DATA = pathlib.Path(__file__).resolve().parent.parent / "fibseg_jax" / "data"
PACKAGE = "fibseg_jax.data"


def _imports(path: pathlib.Path) -> set[str]:
  """The fibseg_jax.data modules `path` imports (short names, e.g. "loader")."""
  modules = {p.stem for p in DATA.glob("*.py")} - {"__init__"}
  found = set()
  for node in ast.walk(ast.parse(path.read_text())):
    if isinstance(node, ast.ImportFrom) and node.module:
      if node.module == PACKAGE:
        found |= {a.name for a in node.names if a.name in modules}
      elif node.module.startswith(PACKAGE + "."):
        found.add(node.module.split(".")[2])
    elif isinstance(node, ast.Import):
      found |= {a.name.split(".")[2] for a in node.names if a.name.startswith(PACKAGE + ".")}
  return found - {path.stem}


def graph() -> dict[str, set[str]]:
  return {p.stem: _imports(p) for p in DATA.glob("*.py") if p.stem != "__init__"}


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
  """A circle of imports as [a, b, ..., a], or None."""
  state: dict[str, int] = {}  # 1 on the path, 2 done
  path: list[str] = []

  def visit(node: str) -> list[str] | None:
    state[node] = 1
    path.append(node)
    for nxt in sorted(edges.get(node, ())):
      if state.get(nxt) == 1:
        return path[path.index(nxt) :] + [nxt]
      if nxt not in state and (cycle := visit(nxt)):
        return cycle
    path.pop()
    state[node] = 2
    return None

  for node in sorted(edges):
    if node not in state and (cycle := visit(node)):
      return cycle
  return None


def test_find_cycle_finds_one():
  assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
  assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_the_loader_imports_its_rooms():
  edges = graph()
  assert {"plans", "reader", "loader_config"} <= edges["loader"]
  assert "loader" not in edges["plans"] and "loader" not in edges["reader"]


def test_no_import_circle_in_data():
  cycle = find_cycle(graph())
  assert cycle is None, f"import circle in fibseg_jax/data: {' -> '.join(cycle)}"


@pytest.mark.parametrize("module", ["loader", "plans", "reader", "loader_config"])
def test_each_module_imports_alone(module):
  subprocess.run([sys.executable, "-c", f"import {PACKAGE}.{module}"], check=True, timeout=120)


def test_one_monai_recipe_for_the_benchmark_and_the_study():
  """Only bench/peer.py's `monai_training` builds the MONAI loss and optimizer."""
  from fibseg_jax.bench import peer
  from fibseg_jax.data import volume

  assert peer.IGNORE_LABEL == volume.IGNORE_LABEL
  package = DATA.parent
  builders = {"DiceLoss", "DiceCELoss", "CrossEntropyLoss", "AdamW"}
  found = []
  for path in [*package.glob("bench/*.py"), *package.glob("study/*.py")]:
    for node in ast.walk(ast.parse(path.read_text())):
      if isinstance(node, ast.Call):
        name = getattr(node.func, "attr", getattr(node.func, "id", None))
        if name in builders:
          found.append(f"{path.parent.name}/{path.name}:{node.lineno} {name}")
  assert found and all(f.startswith("bench/peer.py") for f in found), found
