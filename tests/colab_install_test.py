"""The notebooks' install line on a Colab-like runtime keeps its accelerator.

A Colab TPU or GPU runtime (and a TPU VM or CUDA image) already has jax
with libtpu or the CUDA plugin, and the full `tensorflow`. This builds such
a runtime in a fresh Python 3.12 venv (the newest `jax[tpu]` or
`jax[cuda12-local]`, and `tensorflow`), runs the notebooks' install line
there, and checks that jax, jaxlib and the TPU or CUDA runtime are the ones
the runtime had, that no second TensorFlow came in, and that cvqcar and the
quick start's config load.

The CUDA runtime is `jax[cuda12-local]`: the same jax, jaxlib and CUDA
plugin as `jax[cuda12]`, without the 3 GB of NVIDIA library wheels, which
nothing in the install line touches. Nothing is cached (`--no-cache-dir`),
so the whole test needs about 2 GB of free disk. It downloads about 1.5 GB, so
it runs only with CVQCAR_INSTALL_TESTS=1 (CI's Python 3.12 job sets it).
"""

import json
import os
import pathlib
import shutil
import subprocess

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
INSTALL_LINE = "!pip install -q -e ."  # from the repository root
RUNTIMES = {
    "tpu": (["jax[tpu]"], ["jax", "jaxlib", "libtpu"]),
    "cuda": (["jax[cuda12-local]"], ["jax", "jaxlib", "jax-cuda12-plugin",
                               "jax-cuda12-pjrt"]),
}
TENSORFLOWS = ("tensorflow", "tensorflow-cpu", "tensorflow-intel",
               "tf-nightly", "tensorflow-gpu")


def test_every_notebook_installs_with_the_tested_line():
  for path in NOTEBOOKS:
    cells = json.loads(path.read_text())["cells"]
    lines = [ln.strip().lstrip("#").strip() for c in cells
             for ln in c["source"] if "pip install" in ln]
    assert lines and lines[0].split("  #")[0] == INSTALL_LINE, (path.name,
                                                                lines)


def _python312() -> str | None:
  """A working Python 3.12: on PATH or under pyenv (as .ci/run finds it)."""
  candidates = [shutil.which("python3.12")]
  try:
    root = subprocess.run(["pyenv", "root"], capture_output=True, text=True,
                          check=True).stdout.strip()
    candidates += [str(v / "bin" / "python3.12") for v in sorted(
        pathlib.Path(root, "versions").glob("3.12*"), reverse=True)]
  except (OSError, subprocess.CalledProcessError):
    pass
  for candidate in filter(None, candidates):
    ok = subprocess.run(
        [candidate, "-c", "import sys; assert sys.version_info[:2] =="
         " (3, 12)"], capture_output=True)
    if ok.returncode == 0:
      return candidate
  return None


def _installed(python: str) -> dict[str, str]:
  out = subprocess.run([python, "-m", "pip", "list", "--format=json"],
                       capture_output=True, text=True, check=True).stdout
  return {p["name"].lower(): p["version"] for p in json.loads(out)}


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("CVQCAR_INSTALL_TESTS") != "1",
                    reason="downloads GBs: set CVQCAR_INSTALL_TESTS=1")
@pytest.mark.parametrize("runtime", sorted(RUNTIMES))
def test_the_install_line_keeps_the_runtimes_jax_and_tensorflow(
    runtime, tmp_path):
  python = _python312()
  if python is None:
    pytest.skip("no Python 3.12 (PATH or pyenv)")
  venv = tmp_path / "colab"
  subprocess.run([python, "-m", "venv", str(venv)], check=True)
  try:
    _install_and_check(venv, runtime, tmp_path)
  finally:
    shutil.rmtree(venv, ignore_errors=True)  # GBs of wheels


def _install_and_check(venv, runtime, tmp_path):
  py = str(venv / "bin" / "python")
  extras, kept = RUNTIMES[runtime]
  pip = [py, "-m", "pip", "install", "-q", "--disable-pip-version-check",
         "--no-cache-dir"]
  # The runtime as shipped (without byte-compiling its many files: CI time).
  subprocess.run(pip + ["--no-compile"] + extras + ["tensorflow"],
                 check=True)
  before = _installed(py)
  for name in kept + ["tensorflow"]:
    assert name in before, (name, sorted(before))
  # Exactly the notebooks' line, from the repository root.
  subprocess.run(pip[:3] + INSTALL_LINE.split()[1:], cwd=ROOT, check=True,
                 env={**os.environ, "PIP_NO_CACHE_DIR": "1"})
  after = _installed(py)
  for name in kept + ["tensorflow"]:
    assert after[name] == before[name], (name, before[name], after[name])
  assert [t for t in TENSORFLOWS if t in after] == ["tensorflow"]
  check = ("import cvqcar, jax\n"
           "from configs import cvq_tokenizer\n"
           "config = cvq_tokenizer.get_config('tiny')\n"
           "print(jax.__version__, config.model.quantize)\n")
  out = subprocess.run([py, "-c", check], cwd=tmp_path, check=True,
                       capture_output=True, text=True)
  assert out.stdout.split() == [before["jax"], "channel"], out
