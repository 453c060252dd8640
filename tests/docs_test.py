"""The docs stay true: every command, flag, config argument and field, path
and module that README.md and docs/*.md name exists.

A static check, run on the text (no command is executed; the README's quick
start and CAR sequence also run for real in readme_commands_test.py):
- each shell command in a ```bash block: a `python -m cvqcar.X` module or a
  `python path.py` / `launch/x.sh` script exists (a script invoked by its
  path is executable); every `--flag` is one the command defines (absl
  flags and argparse options, read from its source and the project modules
  it imports); every `configs/X.py:ARGS` loads with those arguments and
  every `--config.a.b` override names a field of that config;
- every repository path named (in code, inline code or a link) exists;
- `from cvqcar... import name` in a ```python block names something real;
- the layout table of docs/development.md lists every module of cvqcar/
  and names only real ones, and its commands exist.
The tests at the end feed it one wrong line of each kind and check it
catches each.
"""

from __future__ import annotations

import functools
import glob
import importlib
import os
import pathlib
import re
import shlex
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parent.parent
# Top-level folders whose paths the docs name; outputs (runs/, exports/,
# samples/, eval/) are not checked.
SOURCE_DIRS = ("cvqcar", "configs", "launch", "bench", "docs", "tests",
               "notebooks", ".ci")
PATH_RE = re.compile(
    r"^(?:\.ci|cvqcar|configs|launch|bench|docs|tests|notebooks)/[\w./*-]*$"
    r"|^(?:README\.md|LICENSE|CITATION\.cff|pyproject\.toml|constraints\.txt"
    r"|requirements(?:-\w+)?\.txt|Dockerfile|\.dockerignore)$")
CONFIG_RE = re.compile(r"(?:^|=)(configs/(?!sweeps/)\w+\.py)(?::(\S*))?$")
# absl's own flags, which every absl command accepts.
ABSL_FLAGS = {"help", "helpfull", "helpshort", "helpxml", "flagfile",
              "logtostderr", "alsologtostderr", "log_dir", "verbosity", "v",
              "stderrthreshold", "only_check_args", "undefok"}
PYTHONS = re.compile(r"^(?:\S*/)?python(?:3(?:\.\d+)?)?$")


def doc_texts() -> dict[str, str]:
  names = ["README.md"] + sorted(
      os.path.relpath(p, REPO) for p in glob.glob(str(REPO / "docs/*.md")))
  return {n: (REPO / n).read_text() for n in names}


def code_blocks(text: str, languages: tuple[str, ...]) -> list[str]:
  return [m.group(2) for m in re.finditer(r"```(\w*)\n(.*?)```", text, re.S)
          if m.group(1) in languages]


def shell_commands(block: str) -> list[list[str]]:
  """argv of each command in a shell block (continuations joined, `&&`,
  `;` and `|` split, leading VAR=value assignments and `!` dropped), and of
  the commands a `--command=...` (gcloud ssh, xpk) runs remotely."""
  out = []
  for line in block.replace("\\\n", " ").splitlines():
    line = line.strip()
    if not line or line.startswith("#"):
      continue
    try:
      words = shlex.split(line, comments=True)
    except ValueError as e:
      raise ValueError(f"cannot parse {line!r}: {e}") from e
    command: list[str] = []
    for word in words + ["&&"]:
      if word in ("&&", ";", "|", "||"):
        while command and re.match(r"^\w+=", command[0]):
          command.pop(0)
        if command:
          out.append(command)
        for w in command:  # a command line run remotely
          if w.startswith("--command="):
            out += shell_commands(w.partition("=")[2])
        command = []
      else:
        command.append(word)
  return out


# ---- what a command defines --------------------------------------------------


def _module_file(module: str) -> pathlib.Path | None:
  base = REPO / module.replace(".", "/")
  for candidate in (base.with_suffix(".py"), base / "__init__.py"):
    if candidate.exists():
      return candidate
  return None


def _imported_files(path: pathlib.Path) -> list[pathlib.Path]:
  """The project modules `path` imports (cvqcar, bench)."""
  text, out = path.read_text(), []
  for m in re.finditer(r"^\s*from ((?:cvqcar|bench)(?:\.\w+)*) import ([^\n(]+"
                       r"|\([^)]*\))", text, re.M):
    names = re.findall(r"\w+", m.group(2))
    for name in names:
      f = _module_file(f"{m.group(1)}.{name}")
      if f:
        out.append(f)
    f = _module_file(m.group(1))
    if f:
      out.append(f)
  for m in re.finditer(r"^\s*import ((?:cvqcar|bench)(?:\.\w+)*)", text, re.M):
    f = _module_file(m.group(1))
    if f:
      out.append(f)
  return out


@functools.cache
def defined_flags(path: pathlib.Path) -> frozenset[str]:
  """Flags a script defines, with those of the project modules it imports
  (absl `DEFINE_*("name"` and argparse `add_argument("--name"`)."""
  seen, todo, names = set(), [path], set()
  while todo:
    f = todo.pop()
    if f in seen:
      continue
    seen.add(f)
    text = f.read_text()
    names |= set(re.findall(r"DEFINE_\w+\(\s*\"(\w+)\"", text))
    names |= {n.replace("-", "_") for n in
              re.findall(r"add_argument\(\s*\"--([\w-]+)\"", text)}
    todo += _imported_files(f)
  return frozenset(names)


def _is_boolean(path: pathlib.Path, name: str) -> bool:
  files = [path] + _imported_files(path)
  return any(re.search(rf"DEFINE_bool(?:ean)?\(\s*\"{name}\"", f.read_text())
             or re.search(rf"\"--{name}\".*BooleanOptionalAction",
                          f.read_text()) for f in files)


@functools.cache
def load_config(name: str, args: str):
  """configs/NAME.py's get_config(args), or the error it raised."""
  if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))
  module = importlib.import_module(f"configs.{name}")
  try:
    return module.get_config(args) if args else module.get_config()
  except Exception as e:  # noqa: BLE001 - any failure is the finding.
    return e


def has_field(config, dotted: str) -> bool:
  node = config
  for part in dotted.split("."):
    try:
      keys = node.keys()
    except AttributeError:
      return False
    if part not in keys:
      return False
    node = node[part]
  return True


# ---- the checks --------------------------------------------------------------


def check_command(argv: list[str], where: str) -> list[str]:
  problems = []
  say = lambda msg: problems.append(f"{where}: `{shlex.join(argv)}`: {msg}")
  if argv[0] in ("sudo", "nohup", "exec", "time", "!"):
    argv = argv[1:]
  if not argv:
    return problems
  script = None  # the file whose flags the command takes
  rest = argv[1:]
  if PYTHONS.match(argv[0]):
    if argv[1:2] == ["-m"]:
      module = argv[2]
      if module.startswith("cvqcar"):
        script = _module_file(module)
        if script is None:
          say(f"no module {module}")
          return problems
        if "__main__" not in script.read_text():
          say(f"{module} is not a command (no __main__)")
      rest = argv[3:]
    elif argv[1:2] and argv[1].endswith(".py"):
      script = REPO / argv[1]
      if not script.exists():
        say(f"no script {argv[1]}")
        return problems
      rest = argv[2:]
  elif PATH_RE.match(argv[0]):
    path = REPO / argv[0]
    if not path.exists():
      say(f"no script {argv[0]}")
      return problems
    if not os.access(path, os.X_OK):
      say(f"{argv[0]} is not executable (run it with python or bash)")
    if path.suffix == ".py":
      script = path
  elif argv[0] == "bash" and len(argv) > 1 and PATH_RE.match(argv[1]):
    if not (REPO / argv[1]).exists():
      say(f"no script {argv[1]}")
  # Paths and configs named anywhere in the command.
  config = None
  for word in argv[1:]:
    value = word.split("=", 1)[1] if word.startswith("-") and "=" in word \
        else word
    m = CONFIG_RE.search(value)
    if m:
      name = pathlib.Path(m.group(1)).stem
      if not (REPO / m.group(1)).exists():
        say(f"no config {m.group(1)}")
        continue
      config = load_config(name, m.group(2) or "")
      if isinstance(config, Exception):
        say(f"configs/{name}.py:{m.group(2)}: {config}")
        config = None
      continue
    candidate = value.split(":")[0]
    if PATH_RE.match(candidate) and not glob.glob(str(REPO / candidate)):
      say(f"no path {candidate}")
  # Flags.
  if script is not None:
    known = defined_flags(script) | ABSL_FLAGS
    for word in rest:
      if not word.startswith("--") or word == "--":
        continue
      flag = word[2:].split("=", 1)[0]
      if flag.startswith("config."):
        if "config" not in known:
          say(f"--{flag}: the command has no --config")
        elif config is not None and not has_field(config, flag[7:]):
          say(f"--{flag}: the config has no field {flag[7:]}")
        continue
      if flag.replace("-", "_") in known:
        continue
      if flag.startswith("no") and flag[2:] in known and _is_boolean(
          script, flag[2:]):
        continue
      say(f"unknown flag --{flag}")
  elif config is not None:  # a launcher passing overrides through
    for word in rest:
      if word.startswith("--config."):
        field = word[9:].split("=", 1)[0]
        if not has_field(config, field):
          say(f"--config.{field}: the config has no field {field}")
  return problems


def check_paths(name: str, text: str) -> list[str]:
  """Inline-code paths and relative links that name repository files."""
  problems = []
  prose = re.sub(r"```.*?```", "", text, flags=re.S)
  for m in re.finditer(r"`([^`\n]+)`", prose):
    token = m.group(1).split(":")[0].rstrip(".,")
    if PATH_RE.match(token) and not glob.glob(str(REPO / token)):
      problems.append(f"{name}: no path {token}")
  for m in re.finditer(r"\]\(([^)#\s]*)(?:#([^)\s]*))?\)", text):
    target, anchor = m.group(1), m.group(2)
    if re.match(r"^\w+:", target):
      continue
    path = (REPO / name).parent / target if target else REPO / name
    if not path.exists():
      problems.append(f"{name}: broken link {target}")
    elif anchor and path.suffix == ".md" and anchor not in anchors(
        path.read_text()):
      problems.append(f"{name}: no heading #{anchor} in {target or name}")
  return problems


def anchors(text: str) -> set[str]:
  """GitHub's anchors of a markdown file's headings: lower case, spaces to
  '-', punctuation other than '-' and '_' dropped."""
  text = re.sub(r"```.*?```", "", text, flags=re.S)
  return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-")
          for h in re.findall(r"^#+ (.+)$", text, re.M)}


def check_python(name: str, block: str) -> list[str]:
  problems = []
  for m in re.finditer(r"^from ((?:cvqcar|configs)(?:\.\w+)*) import (.+)$",
                       block, re.M):
    module, names = m.group(1), re.findall(r"\w+", m.group(2))
    f = _module_file(module)
    if f is None:
      problems.append(f"{name}: no module {module}")
      continue
    text = f.read_text()
    for n in names:
      if _module_file(f"{module}.{n}") is None and not re.search(
          rf"^(?:def|class) {n}\b|^{n}\s*[:=]", text, re.M):
        problems.append(f"{name}: {module} has no {n}")
  return problems


def layout_table(text: str) -> list[list[str]]:
  """The first cells of the table under '## Layout', as lists of paths (a
  bare file name resolved in the folder of the path before it)."""
  section = text[text.index("## Layout"):]
  rows = []
  for line in section.splitlines()[1:]:
    if line.startswith("## "):
      break
    if not line.startswith("| `"):
      continue
    cell = line.split("|")[1]
    paths, folder = [], ""
    for token in re.findall(r"`([^`]+)`", cell):
      if "/" not in token:
        token = folder + token
      folder = token if token.endswith("/") else token.rsplit("/", 1)[0] + "/"
      paths.append(token)
    rows.append(paths)
  return rows


def check_layout(text: str) -> list[str]:
  problems = []
  listed = {p for row in layout_table(text) for p in row}
  for path in sorted(listed):
    if not glob.glob(str(REPO / path)):
      problems.append(f"docs/development.md layout: no path {path}")
  modules = sorted(
      os.path.relpath(p, REPO) for p in glob.glob(str(REPO / "cvqcar/**/*.py"),
                                                  recursive=True)
      if not p.endswith("__init__.py"))
  for module in modules:
    if module not in listed:
      problems.append(f"docs/development.md layout: {module} is not listed")
  section = text[text.index("## Layout"):]
  for module in re.findall(r"python -m (cvqcar[\w.]*)", section):
    f = _module_file(module)
    if f is None or "__main__" not in f.read_text():
      problems.append(f"docs/development.md layout: no command {module}")
  return problems


def commands_of(text: str) -> list[list[str]]:
  """The shell commands of a doc: its ```bash blocks, and inline code that
  starts a project command (`python -m cvqcar...`, `python launch/...`,
  `python bench/...`, possibly wrapped over lines)."""
  commands = [argv for block in code_blocks(text, ("bash", "sh", "shell"))
              for argv in shell_commands(block)]
  prose = re.sub(r"```.*?```", "", text, flags=re.S)
  for m in re.finditer(r"`((?:\.venv/bin/)?python3? (?:-m cvqcar|launch/|"
                       r"bench/)[^`]*)`", prose):
    commands += shell_commands(m.group(1).replace("\n", " "))
  return commands


def problems_of(texts: dict[str, str]) -> list[str]:
  problems = []
  for name, text in texts.items():
    for argv in commands_of(text):
      problems += check_command(argv, name)
    for block in code_blocks(text, ("python",)):
      problems += check_python(name, block)
    problems += check_paths(name, text)
  problems += check_layout(texts["docs/development.md"])
  return problems


def test_the_docs_name_only_what_exists():
  texts = doc_texts()
  problems = problems_of(texts)
  assert not problems, "\n".join(problems)
  # The check saw the docs' commands (a parser that found none would pass).
  commands = [argv for text in texts.values() for argv in commands_of(text)]
  modules = {argv[2] for argv in commands if argv[1:2] == ["-m"]}
  assert len(commands) > 50 and {"cvqcar.train", "cvqcar.export",
                                 "cvqcar.evaluate"} <= modules


GUIDES = ("training", "scaling", "imagenet", "car_at_scale", "evaluation",
          "development")


def test_the_readme_is_a_front_door_to_every_guide():
  readme = (REPO / "README.md").read_text()
  assert len(readme.splitlines()) <= 180
  for guide in GUIDES:
    assert f"](docs/{guide}.md)" in readme, guide
  for name in ("LICENSE", "CITATION.cff"):
    assert (REPO / name).exists()
  assert "arxiv.org/abs/2605.26089" in readme  # CVQ / CAR
  assert "arxiv.org/abs/2305.11718" in readme  # DQ-VAE


@pytest.mark.parametrize("doc,wrong,expected", [
    ("README.md", "```bash\npython -m cvqcar.export --workdirr=runs/x"
     " --out=exports/x\n```\n", "unknown flag --workdirr"),
    ("docs/training.md", "```bash\npython -m cvqcar.train"
     " --config=configs/cvq_tokenizer.py:tiny,codes=16384"
     " --workdir=runs/x\n```\n", "codes"),
    ("docs/scaling.md", "```bash\npython launch/compile_check.py"
     " --config=configs/cvq_tokenizer.py --num_devices=8"
     " --config.model.num_codez=16384\n```\n", "no field model.num_codez"),
    ("docs/scaling.md", "```bash\nlaunch/tpu_pod.sh configs/car_stage1.py"
     " gs://b/w --config.mesh.fdsp=8\n```\n", "no field mesh.fdsp"),
    ("docs/evaluation.md", "See `cvqcar/evaluation/nowhere.py`.\n",
     "no path cvqcar/evaluation/nowhere.py"),
    ("docs/imagenet.md", "```bash\npython bench/missing.py\n```\n",
     "no script bench/missing.py"),
    ("docs/car_at_scale.md", "[x](nowhere.md)\n", "broken link nowhere.md"),
    ("README.md", "[x](docs/training.md#no-such-section)\n",
     "no heading #no-such-section in docs/training.md"),
    ("README.md", "```python\nfrom cvqcar.tokenizer.export import"
     " load_tokeniser\n```\n", "has no load_tokeniser"),
    ("docs/development.md", "```bash\nlaunch/compile_check.py --help\n```\n",
     "not executable"),
    ("docs/car_at_scale.md", "```bash\ngcloud compute tpus tpu-vm ssh t"
     " --worker=all --command='cd cvqcar && .venv/bin/python -m"
     " cvqcar.tokenize_dataset --outt=o'\n```\n", "unknown flag --outt"),
])
def test_the_check_catches_a_wrong_line(doc, wrong, expected):
  texts = doc_texts()
  texts[doc] += "\n" + wrong
  new = [p for p in problems_of(texts) if p not in problems_of(doc_texts())]
  assert len(new) == 1 and expected in new[0], new


def test_the_check_catches_a_module_missing_from_the_layout():
  texts = doc_texts()
  layout = texts["docs/development.md"]
  row = next(line for line in layout.splitlines()
             if line.startswith("| `cvqcar/loop.py`"))
  texts["docs/development.md"] = layout.replace(row + "\n", "")
  assert "docs/development.md layout: cvqcar/loop.py is not listed" in (
      problems_of(texts))
