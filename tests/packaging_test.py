"""The package: one dependency list, and an installed copy with its configs."""

import os
import pathlib
import shutil
import subprocess
import sys
import tomllib
import zipfile

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent


def test_requirements_files_install_the_project_and_its_extras_only():
  """pyproject.toml is the one list: each requirements file is the tested
  constraints and the project with extras it defines; nothing else."""
  project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
  extras = set(project["optional-dependencies"])
  assert {"cpu", "tpu", "cuda", "notebooks", "test", "dev"} <= extras
  # TensorFlow itself is an extra: a host's own tensorflow is kept.
  assert not any(d.split(">")[0] in ("tensorflow", "tensorflow-cpu")
                 for d in project["dependencies"])
  for name in ("requirements.txt", "requirements-dev.txt",
               "requirements-test.txt"):
    lines = [ln for ln in (ROOT / name).read_text().splitlines()
             if ln.strip() and not ln.startswith("#")]
    assert lines[0] == "-c constraints.txt" and len(lines) == 2, name
    assert lines[1].startswith("-e .["), name
    assert set(lines[1][len("-e .["):-1].split(",")) <= extras, name
  # Constraints bound only what the project depends on.
  names = {d.split(">")[0].split("=")[0].split("[")[0]
           for d in project["dependencies"]}
  for line in (ROOT / "constraints.txt").read_text().splitlines():
    if line.strip() and not line.startswith("#"):
      assert line.split("<")[0] in names, line


@pytest.mark.slow
def test_a_wheel_carries_cvqcar_and_its_configs_outside_the_checkout(
    tmp_path):
  # A copy of what a wheel is built from: setuptools writes build/ and
  # *.egg-info/ beside the sources it builds.
  src = tmp_path / "src"
  for name in ("pyproject.toml", "README.md", "LICENSE"):
    (src / name).parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(ROOT / name, src / name)
  for package in ("cvqcar", "configs"):
    shutil.copytree(ROOT / package, src / package,
                    ignore=shutil.ignore_patterns("__pycache__"))
  subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q",
                  "-w", str(tmp_path / "dist"), str(src)], check=True)
  (wheel,) = (tmp_path / "dist").glob("cvqcar-*.whl")
  names = zipfile.ZipFile(wheel).namelist()
  for want in ("cvqcar/__init__.py", "cvqcar/dq/sampler.py",
               "configs/cvq_tokenizer.py", "configs/sweeps/equal_budget.py"):
    assert want in names, want
  assert not any(n.startswith(("tests/", "bench/")) for n in names)
  site = tmp_path / "site"
  subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q",
                  "--target", str(site), str(wheel)], check=True)
  script = (
      "import cvqcar, configs\n"
      "from configs import cvq_tokenizer\n"
      "from cvqcar import train\n"
      f"assert cvqcar.__file__.startswith({str(site)!r}), cvqcar.__file__\n"
      "print(cvq_tokenizer.get_config('tiny').model.quantize)\n"
      "print(train.resolve_config_path('configs/cvq_tokenizer.py'))\n")
  env = dict(os.environ, PYTHONPATH=str(site))
  out = subprocess.run([sys.executable, "-c", script], cwd=tmp_path,
                       env=env, capture_output=True, text=True, check=True)
  quantize, path = out.stdout.split()
  assert quantize == "channel"
  assert path == str(site / "configs" / "cvq_tokenizer.py")


def test_the_import_time_jax_check_matches_constraints_and_warns(
    monkeypatch, caplog):
  import cvqcar

  bound = [ln for ln in (ROOT / "constraints.txt").read_text().splitlines()
           if ln.startswith("jax<")][0]
  assert bound == "jax<{}.{}".format(*cvqcar.JAX_UNTESTED_FROM)
  from importlib import metadata

  monkeypatch.setattr(metadata, "version", lambda name: "0.13.1")
  with caplog.at_level("WARNING", logger="cvqcar"):
    cvqcar._warn_if_untested_jax()
  assert "pip install -c constraints.txt -e ." in caplog.text
  caplog.clear()
  monkeypatch.setattr(metadata, "version", lambda name: "0.12.9")
  cvqcar._warn_if_untested_jax()
  assert not caplog.text
