"""launch/compile_check.py: memory per device, compiled on fake devices."""

import json
import sys

import pytest
from launch_test import CONFIG, run

# The conftest tiny_config() shrink, as command-line overrides.
TINY = ["--config.model.resolution=16", "--config.model.base_channels=8",
        "--config.model.norm_groups=4", "--config.model.latent_channels=8",
        "--config.model.num_codes=64", "--config.batch_size=8"]


def compile_check(*args):
  return run([sys.executable, "launch/compile_check.py",
              f"--config={CONFIG}", *TINY, *args], timeout=600)


@pytest.mark.slow
def test_compile_check_reports_memory_per_device():
  # With the LPIPS loss asked for and no weight file, its VGG16 is counted
  # (random weights of the real shapes: 14.7M float32 parameters, 56 MiB,
  # replicated, so in every device's arguments).
  out = compile_check("--num_devices=8", "--config.loss.perceptual_weight=1")
  assert out.returncode == 0, out.stderr[-3000:]
  assert "mesh: data=8 fsdp=1 model=1 (8 x cpu)" in out.stdout
  for name in ("argument", "output", "temp", "generated code", "alias",
               "peak estimate"):
    assert f"\n  {name} " in out.stdout, out.stdout
  assert "(LPIPS counted, random weights)" in out.stdout
  argument_mib = float(out.stdout.split("\n  argument ")[1].split()[0])
  assert argument_mib > 56, out.stdout
  assert "compile_check: OK" in out.stdout


@pytest.mark.slow
def test_compile_check_fails_when_the_peak_does_not_fit():
  # 4 devices, although the conftest's XLA_FLAGS (inherited) asks for 8.
  out = compile_check("--num_devices=4", "--device_memory_gib=0.000001")
  assert out.returncode == 1, out.stderr[-3000:]
  assert "mesh: data=4 fsdp=1 model=1" in out.stdout
  assert "exceeds --device_memory_gib=1e-06" in out.stderr


@pytest.mark.slow
def test_compile_check_compiles_car_and_fsdp_shards_its_state(tmp_path):
  sizes = {}
  for mesh in ("--config.mesh.data=8", "--config.mesh.fsdp=8"):
    path = tmp_path / "memory.json"
    out = run([sys.executable, "launch/compile_check.py",
               "--config=configs/car_stage2.py:tiny", "--num_devices=8",
               "--config.mesh.data=1", mesh, f"--json_out={path}"],
              timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "CAR stage 2:" in out.stdout and "compile_check: OK" in out.stdout
    sizes[mesh] = json.loads(path.read_text())
  data, fsdp = sizes["--config.mesh.data=8"], sizes["--config.mesh.fsdp=8"]
  assert data["mesh"] == {"data": 8, "fsdp": 1, "model": 1}
  # The state (the step's output: it is donated) replicated vs split eight
  # ways; the frozen codebook (1024 x 256 float32) stays replicated.
  codebook = 1024 * 256 * 4
  assert (fsdp["output"] - codebook) < (data["output"] - codebook) / 6, (
      fsdp, data)


# The tiny CAR's sampler with a short prompt, so that its KV cache (16.6 MiB
# for 64 prompts and their unconditional rows) outweighs the rest.
SAMPLE = ["--job=sample", "--config=configs/car_stage1.py:tiny",
          "--config.batch_size=64", "--config.max_text_len=8"]


def test_compile_check_sample_reports_memory_and_splits_the_kv_cache(
    tmp_path):
  path = tmp_path / "memory.json"
  out = run([sys.executable, "launch/compile_check.py", *SAMPLE,
             "--num_devices=8", "--config.mesh.data=1",
             "--config.mesh.fsdp=4", "--config.mesh.model=2",
             f"--json_out={path}"])
  assert out.returncode == 0, out.stderr[-3000:]
  assert "mesh: data=1 fsdp=4 model=2 (8 x cpu)" in out.stdout
  assert "CAR sampler (stage 1):" in out.stdout
  assert "parameters in bfloat16" in out.stdout
  assert "split 4 ways over the batch and 2 over kv heads" in out.stdout
  for name in ("argument", "output", "temp", "peak estimate"):
    assert f"\n  {name} " in out.stdout, out.stdout
  assert "compile_check: OK" in out.stdout
  r = json.loads(path.read_text())
  assert r["job"] == "sample" and r["fits"]
  assert r["kv_cache_per_device"] * 8 == r["kv_cache"]
  # Split 8 ways (batch and kv heads), the cache's live copies take 0.43 of
  # one whole cache; split over the batch alone (4 ways) they take 0.85.
  assert r["temp"] < 0.65 * r["kv_cache"], r


def test_compile_check_sample_fails_when_the_peak_does_not_fit():
  out = run([sys.executable, "launch/compile_check.py", *SAMPLE,
             "--num_devices=2", "--param_dtype=float32",
             "--device_memory_gib=0.000001"])
  assert out.returncode == 1, out.stderr[-3000:]
  assert "parameters in float32" in out.stdout
  assert "exceeds --device_memory_gib=1e-06" in out.stderr
  assert "weights and KV cache" in out.stderr


@pytest.mark.parametrize("flags, message", [
    (["--num_devices=4", "--config.mesh.fsdp=8"],
     "config.mesh {'data': 1, 'fsdp': 8, 'model': 1} needs 8 devices,"
     " found 4"),
    (["--num_devices=4", "--config.mesh.model=4"],
     "num_key_value_heads=2 is not divisible by config.mesh.model=4"),
])
def test_compile_check_sample_refuses_a_mesh_before_compiling(flags,
                                                             message):
  out = run([sys.executable, "launch/compile_check.py", *SAMPLE,
             "--config.mesh.data=1", *flags])
  assert out.returncode == 1, out.stderr[-3000:]
  assert message in out.stderr
  assert "lowered and compiled" not in out.stdout


def test_compile_check_sample_needs_a_car_config():
  out = compile_check("--job=sample", "--num_devices=2")
  assert out.returncode == 1
  assert "--job=sample needs a CAR config" in out.stderr
