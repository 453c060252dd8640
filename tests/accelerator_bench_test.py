"""bench/accelerator.py: every part runs, on a stock GPU image's packages."""

import json
import os
import pathlib
import subprocess
import sys

import jax.numpy as jnp
import numpy as np

from bench import accelerator
from configs import car_stage2, cvq_tokenizer

ROOT = pathlib.Path(__file__).resolve().parent.parent
# Not on the GPU machine's image: the run must import none of them. Also
# torchvision, which that image lacks and whose PyPI wheel fails to import
# beside the CPU torch the tests install (tests/torch_references.py).
ABSENT = ("tensorflow", "tensorflow_datasets", "clu", "grain",
          "ml_collections", "array_record", "torchvision")
# Uninstalled, as the finder of installed packages sees it: `import` raises
# ModuleNotFoundError and importlib.util.find_spec (transformers probes
# packages with it) returns None.
_RUN_WITHOUT = f"""
import importlib.machinery, runpy, sys

_find = importlib.machinery.PathFinder.find_spec

def find_spec(name, path=None, target=None):
  if name.partition(".")[0] in {ABSENT!r}:
    return None
  return _find(name, path, target)

importlib.machinery.PathFinder.find_spec = find_spec
sys.argv = ["bench/accelerator.py"] + sys.argv[1:]
try:
  runpy.run_path("bench/accelerator.py", run_name="__main__")
except SystemExit as stop:
  code = stop.code
for name in {ABSENT!r}:
  assert name not in sys.modules, name
sys.exit(code)
"""


def test_smoke_runs_every_part_without_tf_clu_grain_ml_collections(
    tmp_path):
  out = tmp_path / "benchmarks.md"
  doc = ROOT / "docs" / "benchmarks.md"
  before = doc.read_text() if doc.exists() else None
  env = dict(os.environ)
  # One CPU device, as on a one-GPU machine (conftest asks for 8).
  env["XLA_FLAGS"] = env.get("XLA_FLAGS", "").replace(
      "--xla_force_host_platform_device_count=8", "").strip()
  proc = subprocess.run(
      [sys.executable, "-c", _RUN_WITHOUT, "--smoke", f"--out={out}"],
      cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  result = json.loads(proc.stdout.strip().splitlines()[-1].removeprefix(
      "RESULT "))
  assert list(result) == list(accelerator.PARTS)
  for name, part in result.items():
    assert part["rows"] > 0 and part["ok"], (name, part)
    assert f"[{name}] {part['rows']} rows, checks passed" in proc.stdout
  # reference, xla, interpreted pallas (+ matmul) at one shape, two dtypes
  assert result["argmin"]["rows"] == 8
  text = out.read_text()
  for name in ("argmin", "car_step (tiny)", "decode (tiny)",
               "tokenizer (16 px)"):
    assert f"<!-- bench:accelerator: {name} -->" in text
  assert "FAIL" not in text
  assert (doc.read_text() if doc.exists() else None) == before


def _plain(value):
  if isinstance(value, dict):
    return {k: _plain(v) for k, v in value.items()}
  if isinstance(value, list | tuple):
    return [_plain(v) for v in value]
  return value


def _assert_within(mirror, real, where="config"):
  """Every field of the mirror exists in the real config, equal."""
  for key, value in mirror.items():
    assert key in real, f"{where}.{key} is not in the real config"
    if isinstance(value, dict):
      _assert_within(value, real[key], f"{where}.{key}")
    else:
      assert _plain(value) == _plain(real[key]), f"{where}.{key}"


def test_plain_configs_match_the_configs_they_stand_in_for():
  _assert_within(accelerator.stage2_config("0.6b"),
                 car_stage2.get_config("llm=0.6b").to_dict())
  _assert_within(accelerator.tokenizer_config(smoke=False),
                 cvq_tokenizer.get_config("").to_dict())
  smoke = cvq_tokenizer.get_config("tiny,smoke").to_dict()
  _assert_within(accelerator.tokenizer_config(smoke=True), smoke)


def test_the_argmin_check_tells_a_tie_from_a_wrong_code():
  x = jnp.asarray([[0.0, 0.0], [1.0, 1.0]])
  codebook = jnp.asarray([[1.0, 0.0], [0.0, 1.0], [5.0, 5.0]])
  ref = jnp.asarray([0, 1], jnp.int32)
  # Row 0 is equally near codes 0 and 1: either is right.
  assert accelerator._gap(x, codebook, jnp.asarray([1, 1]), ref) == (1, 0.0)
  differ, excess = accelerator._gap(x, codebook, jnp.asarray([0, 2]), ref)
  assert differ == 1 and excess > accelerator.TIE_RTOL
  assert np.isclose(excess, (32.0 - 1.0) / 1.0)
