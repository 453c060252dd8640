"""The documented commands run as written: the README's quick start, then
the tiny CAR sequence of docs/training.md.

Each command is taken from the docs themselves, so the test breaks when
they name a module, flag or config that does not work. Only the number of
training steps is shortened. (docs_test.py checks every other documented
command statically.)
"""

import os
import pathlib
import re
import shlex
import subprocess
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.slow
# Shortened runs: the README's configs with fewer steps and evaluations.
SHORT = {
    "cvq_tokenizer.py": ["--config.num_train_steps=2",
                         "--config.data.num_eval_images=64"],
    "car_stage1.py": ["--config.num_train_steps=2",
                      "--config.data.num_eval_examples=16"],
    "car_stage2.py": ["--config.num_train_steps=2",
                      "--config.data.num_eval_examples=16"],
}


def readme_commands(section: str, doc: str = "README.md") -> list[list[str]]:
  """The `python -m cvqcar...` commands of `doc`'s first bash block after
  `section`, each as argv with the interpreter replaced."""
  text = (REPO / doc).read_text()
  text = text[text.index(section):]
  block = re.search(r"```bash\n(.*?)```", text, re.S).group(1)
  commands = []
  for line in block.replace("\\\n", " ").splitlines():
    for part in line.split("&&"):
      argv = shlex.split(part)
      if "-m" in argv and argv[argv.index("-m") + 1].startswith("cvqcar."):
        commands.append([sys.executable] + argv[argv.index("-m"):])
  assert commands, f"no cvqcar command in the bash block after {section!r}"
  return commands


def shortened(argv: list[str]) -> list[str]:
  for arg in argv:
    if arg.startswith("--config="):
      name = pathlib.Path(arg.split("=", 1)[1].split(":")[0]).name
      return argv + SHORT[name]
  return argv


def run(argv, cwd):
  env = dict(os.environ, PYTHONPATH=str(REPO),
             XLA_FLAGS="--xla_force_host_platform_device_count=1")
  proc = subprocess.run(shortened(argv), cwd=cwd, env=env, text=True,
                        capture_output=True, timeout=600)
  assert proc.returncode == 0, (
      f"{shlex.join(argv)} failed:\n{proc.stdout[-3000:]}"
      f"\n{proc.stderr[-3000:]}")
  return proc


def test_readme_quick_start_and_car_sequence(tmp_path):
  # Relative paths in the README (configs/, runs/, exports/) resolve here.
  (tmp_path / "configs").symlink_to(REPO / "configs")
  quick_start = readme_commands("## Quick start")
  assert [a[2] for a in quick_start] == ["cvqcar.train"]
  run(quick_start[0], tmp_path)
  assert list((tmp_path / "runs" / "cvq_tiny" / "images").glob("recon_*.png"))

  car = readme_commands("## Text-to-image (CAR)", "docs/training.md")
  assert [a[2] for a in car] == ["cvqcar.export", "cvqcar.train",
                                 "cvqcar.train", "cvqcar.export",
                                 "cvqcar.sample"]
  for argv in car:
    run(argv, tmp_path)
  assert (tmp_path / "exports" / "cvq_tiny" / "config.json").exists()
  assert (tmp_path / "exports" / "car2_tiny" / "params").is_dir()
  samples = sorted(p.name for p in (tmp_path / "samples").iterdir())
  assert len(samples) == 2 and samples[1].endswith("_strip.png"), samples


def test_export_refuses_a_workdir_of_unknown_kind(tmp_path):
  (tmp_path / "run").mkdir()
  (tmp_path / "run" / "config.json").write_text('{"trainer": "gan"}')
  proc = subprocess.run(
      [sys.executable, "-m", "cvqcar.export", f"--workdir={tmp_path}/run",
       f"--out={tmp_path}/out"], env=dict(os.environ, PYTHONPATH=str(REPO)),
      text=True, capture_output=True, timeout=300)
  assert proc.returncode != 0
  assert "names trainer 'gan'" in proc.stderr + proc.stdout
