"""The package's import graph follows its architecture, read from source.

commands -> dq -> car -> tokenizer -> kernels, with the shared top-level modules
usable from every room; data imports no model code; nothing but a command
imports a command; no import circles.
"""

import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent / "cvqcar"
COMMANDS = frozenset(
    {"train", "export", "sample", "convert_pairs", "tokenize_dataset",
     "evaluate", "convert_weights", "generate_benchmark", "report", "train_dq",
     "prompt_following", "evaluate_samples"})
SHARED = frozenset(
    {"sharding", "distributed", "checkpoint", "fingerprint", "logs",
     "metrics", "visualize", "optim", "figures", "exit_codes", "loop", "perf",
     "preemption", "workdir_lock", "wandb_writer"})
SUBPACKAGES = ("kernels", "tokenizer", "car", "dq", "data", "evaluation")
# Which rooms each room may import (besides itself).
ALLOWED = {
    "kernels": set(),
    "shared": {"shared"},
    "data": {"shared"},
    "evaluation": {"shared", "data"},  # image sets to score
    "tokenizer": {"shared", "kernels", "data", "evaluation"},
    "car": {"shared", "kernels", "data", "tokenizer", "evaluation"},
    # The DQ-Transformer builds on CAR's backbone and sampling; CAR never
    # imports it.
    "dq": {"shared", "kernels", "data", "tokenizer", "car", "evaluation"},
    "command": {"shared", "kernels", "data", "tokenizer", "car", "dq",
                "evaluation"},
}


def module_name(path: pathlib.Path) -> str:
  parts = path.relative_to(ROOT.parent).with_suffix("").parts
  return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def room(module: str) -> str:
  """'kernels', 'tokenizer', 'car', 'dq', 'data', 'shared' or 'command'."""
  parts = module.split(".")
  if len(parts) == 1:  # the package itself
    return "shared"
  if parts[1] in SUBPACKAGES:
    return parts[1]
  if parts[1] in COMMANDS:
    return "command"
  if parts[1] in SHARED:
    return "shared"
  raise AssertionError(f"{module} belongs to no room: add it to a subpackage"
                       " or to the shared or command lists of this test")


def project_imports(source: str, module: str) -> set[str]:
  """Every cvqcar module `source` imports, at any depth of the file."""
  package = module if module.count(".") == 0 else module.rsplit(".", 1)[0]
  found = set()
  for node in ast.walk(ast.parse(source)):
    if isinstance(node, ast.Import):
      found |= {a.name for a in node.names if a.name.startswith("cvqcar")}
    elif isinstance(node, ast.ImportFrom):
      base = node.module or ""
      if node.level:  # relative import
        anchor = package.split(".")
        anchor = anchor[:len(anchor) - node.level + 1]
        base = ".".join(anchor + ([base] if base else []))
      if not base.startswith("cvqcar"):
        continue
      for alias in node.names:
        # `from cvqcar.car import model` names a module; `from
        # cvqcar.car.model import CAR` names a thing in one.
        candidate = f"{base}.{alias.name}"
        found.add(candidate if candidate in MODULES else base)
  return found


def graph(sources: dict[str, str]) -> dict[str, set[str]]:
  return {m: project_imports(s, m) - {m} for m, s in sources.items()}


def violations(edges: dict[str, set[str]]) -> list[str]:
  """Each import that crosses the architecture the wrong way, and cycles."""
  bad = []
  for module, imports in edges.items():
    for target in imports:
      src, dst = room(module), room(target)
      if dst == "command" and src != "command":
        bad.append(f"{module} imports the command {target}")
      elif dst == "command":
        bad.append(f"command {module} imports command {target}")
      elif src != dst and dst not in ALLOWED[src]:
        bad.append(f"{module} ({src}) imports {target} ({dst})")
  # Cycles: depth-first search with colours over the module graph.
  state, stack = {}, []

  def visit(m):
    state[m] = "open"
    stack.append(m)
    for t in sorted(edges.get(m, ())):
      if state.get(t) == "open":
        cycle = stack[stack.index(t):] + [t]
        bad.append("import circle: " + " -> ".join(cycle))
      elif t not in state:
        visit(t)
    stack.pop()
    state[m] = "done"

  for m in sorted(edges):
    if m not in state:
      visit(m)
  return bad


SOURCES = {module_name(p): p.read_text() for p in ROOT.rglob("*.py")}
MODULES = frozenset(SOURCES)


def test_subpackages_and_shared_modules_exist():
  for package in SUBPACKAGES:
    assert f"cvqcar.{package}" in MODULES, package
  for name in SHARED | COMMANDS:
    assert f"cvqcar.{name}" in MODULES, name


def test_every_module_has_a_room():
  for module in MODULES:
    room(module)


def test_imports_follow_the_architecture():
  assert violations(graph(SOURCES)) == []


def test_kernels_import_nothing_of_the_project():
  for module, imports in graph(SOURCES).items():
    if room(module) == "kernels":
      assert imports <= {"cvqcar.kernels"} | {
          m for m in MODULES if m.startswith("cvqcar.kernels.")}, module


@pytest.mark.parametrize("module,line,expect", [
    ("cvqcar.tokenizer.model", "from cvqcar.car import model",
     "cvqcar.tokenizer.model (tokenizer) imports cvqcar.car.model (car)"),
    ("cvqcar.data.pairs", "from cvqcar.tokenizer import export",
     "cvqcar.data.pairs (data) imports cvqcar.tokenizer.export (tokenizer)"),
    ("cvqcar.kernels.argmin", "from cvqcar import sharding",
     "cvqcar.kernels.argmin (kernels) imports cvqcar.sharding (shared)"),
    ("cvqcar.car.sampling", "from cvqcar import sample",
     "cvqcar.car.sampling imports the command cvqcar.sample"),
    ("cvqcar.metrics", "from cvqcar.tokenizer import quantize",
     "cvqcar.metrics (shared) imports cvqcar.tokenizer.quantize"),
    ("cvqcar.car.model", "from cvqcar.car import pipeline", "import circle"),
    ("cvqcar.car.sampling", "from cvqcar.dq import transformer",
     "cvqcar.car.sampling (car) imports cvqcar.dq.transformer (dq)"),
    ("cvqcar.tokenizer.quantize", "import cvqcar.car.qwen3",
     "cvqcar.tokenizer.quantize (tokenizer) imports cvqcar.car.qwen3 (car)"),
    ("cvqcar.data.text", "from .images import Preprocess", None),
])
def test_a_forbidden_import_is_caught(module, line, expect):
  """The checker fails when the source gains a forbidden import (and
  accepts an allowed relative one)."""
  sources = dict(SOURCES)
  sources[module] = f"def late():\n  {line}\n" + sources[module]
  found = violations(graph(sources))
  if expect is None:
    assert found == []
  else:
    assert any(expect in v for v in found), found
