"""Test setup: 8 fake CPU devices and a tiny tokenizer config."""

import json
import os
import re
import socket
import subprocess
import sys
import tempfile

# Must run before JAX initialises its backends.
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           " --xla_force_host_platform_device_count=8")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# Dozens of tests, their subprocesses (README commands, notebooks, the
# two-process jobs) and the xdist workers compile the same tiny programs:
# JAX's persistent compilation cache compiles each once per machine.
# JAX_COMPILATION_CACHE_DIR= (empty) turns it off.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(
    tempfile.gettempdir(), f"cvqcar-test-jax-cache-{os.getuid()}"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")

# TensorFlow >= 2.20 dlopens itself RTLD_GLOBAL, exporting its static LLVM;
# triton (>= 3.7, pulled in by CUDA torch) loaded after it binds to that LLVM
# and segfaults. torch imports triton lazily (torch._dynamo, reached from
# transformers' model modules), so importing torch first does not help, and
# no env var stops it. Loading triton before any test imports TensorFlow is
# safe and cheap (0.2 s); running HF in subprocesses would cost ~8 s a test.
try:
  import triton  # noqa: F401
except ImportError:
  pass

import pytest  # noqa: E402

ROOT = os.path.join(os.path.dirname(__file__), "..")
import torch_references  # noqa: E402

from configs import cvq_tokenizer  # noqa: E402

torch_references.preload()


def tiny_config(arg: str = "tiny"):
  """The tiny config shrunk further: 16 px, 8 channel tokens of 8x8."""
  config = cvq_tokenizer.get_config(arg)
  config.model.resolution = 16
  config.model.channel_mults = (1, 2)
  config.model.base_channels = 8
  config.model.norm_groups = 4
  config.model.latent_channels = 8
  config.model.num_codes = 64
  config.batch_size = 8
  config.eval_batch_size = 8
  config.data.num_eval_images = 16
  config.data.num_threads = 2
  config.num_train_steps = 4
  config.log_every = 1
  config.eval_every = 1000
  config.checkpoint_every = 2
  config.num_grid_images = 2
  # DQ-VAE: its eval thresholds from 2 training batches, not 16.
  config.model.dynamic.calibration_batches = 2
  return config


def tiny_dq_transformer_config(tmp_path):
  """A DQ-Transformer config shrunk for tests, on an untrained tiny DQ-VAE
  export written under tmp_path: (tokenizer config, config)."""
  from flax import nnx  # noqa: PLC0415

  from configs import dq_transformer  # noqa: PLC0415
  from cvqcar import checkpoint  # noqa: PLC0415
  from cvqcar.tokenizer import model as tokenizer_lib  # noqa: PLC0415

  tok_config = tiny_config("tiny,dynamic")
  tokenizer = tokenizer_lib.Tokenizer(tok_config.model, rngs=nnx.Rngs(0))
  _, params, buffers = nnx.split(tokenizer, nnx.Param, ...)
  checkpoint.save_export(str(tmp_path / "export"), tok_config,
                         {"params": params, "buffers": buffers})
  config = dq_transformer.get_config("tiny")
  config.tokenizer = tok_config.model
  config.tokenizer_export = str(tmp_path / "export")
  config.model.update(width=32, position_layers=1, content_layers=1,
                      num_heads=2, num_kv_heads=1, head_dim=16, mlp_dim=64)
  return tok_config, config


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def run_processes(argv, processes: int, devices: int = 8,
                  timeout: int = 600) -> list[str]:
  """Runs `python -m ...argv` as `processes` localhost jax.distributed
  processes sharing `devices` fake CPU devices; asserts each exits 0 and
  returns their logs (stdout and stderr)."""
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count"
             f"={devices // processes}", JAX_PLATFORMS="cpu")
  cmd = [sys.executable, "-m", *argv]
  if processes > 1:
    cmd += [f"--coordinator_address=localhost:{free_port()}",
            f"--num_processes={processes}"]
  procs = [subprocess.Popen(
      cmd + ([f"--process_id={i}"] if processes > 1 else []), cwd=ROOT,
      env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
      for i in range(processes)]
  logs = []
  for p in procs:
    log, _ = p.communicate(timeout=timeout)
    assert p.returncode == 0, log[-3000:]
    logs.append(log)
  return logs


def printed(text, line) -> bool:
  """Whether `line` ends a line of `text`: another writer to the same file
  (C++ logging on stderr) may have left a partial line before it."""
  return re.search(f"{re.escape(line)}$", text, re.M) is not None


def result_of(text) -> dict:
  """The worker's last 'RESULT {...}' ({step: loss}), wherever it starts."""
  found = re.findall(r"RESULT (\{.*\})$", text, re.M)
  assert found, text[-3000:]
  return {int(k): v for k, v in json.loads(found[-1]).items()}


@pytest.fixture
def config():
  return tiny_config()


@pytest.fixture(scope="session")
def tokenizer_export(tmp_path_factory):
  """The tiny tokenizer trained 2 steps and exported (the real format),
  shared by every test module that needs one."""
  from cvqcar.tokenizer import export
  from cvqcar.tokenizer import trainer as tokenizer_trainer

  root = tmp_path_factory.mktemp("tok")
  config = tiny_config()
  config.num_train_steps = 2
  tokenizer_trainer.train_and_evaluate(config, str(root / "run"))
  return export.export(str(root / "run"), str(root / "export"))


def pytest_collection_modifyitems(config, items):
  """Slow tests first: under `-n ... --dist worksteal` the long end-to-end
  runs start at once and an idle worker steals the quick ones, instead of
  one long run finishing alone at the end."""
  del config
  items.sort(key=lambda item: item.get_closest_marker("slow") is None)
