"""CAR sampling on meshes: exports read onto them, the same tokens on all."""

import dataclasses
import os
import re
import subprocess
import sys

import jax
import ml_collections
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from configs import car_stage2
from conftest import tiny_config
from cvqcar import checkpoint, sharding
from cvqcar.car import benchmark, qwen3, sampling
from cvqcar.car import sampler as sampler_lib
from cvqcar.car import state as car_state

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MESHES = ("data=8", "fsdp=8", "fsdp=4,model=2")


@pytest.fixture(scope="module")
def car_export(tmp_path_factory):
  """A tiny CAR (2 kv heads) with random weights and a random codebook,
  exported as training writes one."""
  config = car_stage2.get_config("tiny")
  config.tokenizer = tiny_config().model
  config.max_text_len = 12
  config.text_tokenizer = "bytes"  # what training resolves 'auto' to here
  config.llm_config = dataclasses.asdict(
      car_state.resolve_llm_config(config))
  one = ml_collections.ConfigDict(config.to_dict())
  one.batch_size = 1
  one.mesh = ml_collections.ConfigDict({"data": 1, "fsdp": 1, "model": 1})
  mesh = sharding.make_mesh(one, jax.devices()[:1])
  k, _, dim = car_state.tokenizer_shape(config.tokenizer)
  codebook = np.random.default_rng(0).normal(size=(k, dim))
  _, state, _ = car_state.init_state(one, mesh, codebook.astype(np.float32))
  out = str(tmp_path_factory.mktemp("car") / "export")
  return checkpoint.save_export(out, config, {
      "params": state.params, "backbone": state.backbone,
      "frozen": state.frozen})


def prompts(rows, seed=1):
  rng = np.random.default_rng(seed)
  ids = rng.integers(1, 200, (rows, 12)).astype(np.int32)
  mask = (np.arange(12)[None] >= rng.integers(0, 6, (rows, 1)))
  return ids, mask.astype(np.int32)


@pytest.mark.parametrize("param_dtype", ["float32", "bfloat16"])
def test_greedy_tokens_are_the_same_on_every_mesh(car_export, param_dtype):
  ids, mask = prompts(6)  # not a multiple of 8: padded rows
  keys = sampling.sample_keys(0, range(6), [0] * 6)
  tokens = {}
  for mesh in ("data=1",) + MESHES:
    car = sampler_lib.Sampler.load(car_export, mesh, param_dtype)
    tokens[mesh] = car.tokens(ids, mask, keys, temperature=0.0,
                              cfg_scale=3.0)
  assert tokens["data=1"].shape == (6, 8)
  # Prompts differ, so rows do: a sampler that mixed up rows would show.
  assert len({tuple(r) for r in tokens["data=1"]}) > 1
  for mesh in MESHES:
    np.testing.assert_array_equal(tokens[mesh], tokens["data=1"], mesh)


def test_weights_are_read_sharded_and_cast(car_export):
  car = sampler_lib.Sampler.load(car_export, "fsdp=4,model=2")
  assert dict(car.mesh.shape) == {"data": 1, "fsdp": 4, "model": 2}
  assert car.batch_ways == 4
  leaves = jax.tree.leaves(car.states)
  assert {x.dtype for x in leaves} == {np.dtype("bfloat16")}
  # A [D, F] MLP kernel: embed over fsdp, mlp over model: 1/8 per device.
  kernels = [x for x in leaves if x.ndim == 3 and
             x.sharding.spec == P(None, "fsdp", "model")]
  assert kernels, [x.sharding.spec for x in leaves]
  for x in kernels:
    assert x.addressable_shards[0].data.size * 8 == x.size
  fp32 = sampler_lib.Sampler.load(car_export, "", "float32")
  assert dict(fp32.mesh.shape) == {"data": 8, "fsdp": 1, "model": 1}
  assert {x.dtype for x in jax.tree.leaves(fp32.states)} == {
      np.dtype("float32")}


def test_the_kv_cache_is_split_over_rows_and_kv_heads():
  config = qwen3.PRESETS["tiny"]
  mesh = jax.make_mesh((1, 4, 2), sharding.MESH_AXES,
                       axis_types=(jax.sharding.AxisType.Auto,) * 3)
  with jax.set_mesh(mesh):
    cache = jax.jit(lambda: qwen3.init_cache(config, 8, 16))()
  # [L, B, S, K, hd]: B over the batch axes, the 2 kv heads over model.
  assert cache.k.sharding.spec == P(None, ("fsdp",), None, ("model",))
  assert cache.k.addressable_shards[0].data.shape == (
      config.num_hidden_layers, 2, 16, 1, config.head_dim)
  assert cache.mask.sharding.spec == P(("fsdp",))


@pytest.mark.parametrize("mesh, says", [
    ("data=1,fsdp=16", "needs 16 devices; this process has 8 and the job 8"),
    ("fsdp=16", "need 16 devices, which divide neither this process's 8"
     " devices nor the job's 8"),
    ("fsdp=3", "need 3 devices, which divide neither this process's 8"),
    ("model=4", "model=4 does not divide the backbone's 2 kv heads"),
    ("fsdp=2,fsdp=4", "names 'fsdp' twice"),
    ("tensor=2", "AXIS in ('data', 'fsdp', 'model')"),
])
def test_a_mesh_that_does_not_fit_is_refused_before_loading(
    tmp_path, car_export, mesh, says):
  import shutil

  # No weights to read: the refusal must come before any are read.
  bare = tmp_path / "bare"
  bare.mkdir()
  shutil.copy(os.path.join(car_export, checkpoint.CONFIG_FILE), bare)
  with pytest.raises(ValueError, match=re.escape(says)):
    sampler_lib.Sampler.load(str(bare), mesh)


def test_benchmark_samples_do_not_depend_on_batch_size(
    car_export, tokenizer_export, tmp_path):
  path = tmp_path / "prompts.txt"
  path.write_text("".join(f"a photo of thing {i}\n" for i in range(3)))
  tokens = {}
  for batch, mesh in ((2, "data=1"), (6, "data=2"), (6, "fsdp=4,model=2")):
    out = tmp_path / f"b{batch}_{mesh}"
    benchmark.generate_benchmark(
        "geneval", str(path), car_export, tokenizer_export, str(out),
        num_images=2, batch_size=batch, temperature=1.0, cfg_scale=3.0,
        mesh=mesh, param_dtype="float32")
    tokens[batch, mesh] = np.stack([np.load(out / f"{i:05d}" / "tokens.npy")
                                    for i in range(3)])
  first = tokens[2, "data=1"]
  assert len({tuple(r) for r in first.reshape(-1, first.shape[-1])}) == 6
  for key, got in tokens.items():
    np.testing.assert_array_equal(got, first, str(key))


@pytest.mark.slow
def test_a_mesh_across_two_processes_samples_as_one(
    car_export, tokenizer_export, tmp_path):
  """fsdp=8 over 2 processes x 4 devices: one model across both hosts,
  process 0 writes, and the tokens are the one-process ones."""
  import socket

  path = tmp_path / "prompts.txt"
  path.write_text("".join(f"prompt {i}\n" for i in range(3)))
  with socket.socket() as s:
    s.bind(("localhost", 0))
    port = s.getsockname()[1]
  out = tmp_path / "two"
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             XLA_FLAGS="--xla_force_host_platform_device_count=4")
  procs = [subprocess.Popen(
      [sys.executable, "-m", "cvqcar.generate_benchmark", "--benchmark=dpg",
       f"--prompts={path}", f"--car={car_export}",
       f"--tokenizer={tokenizer_export}", f"--out={out}", "--batch_size=4",
       "--num_images=2", "--mesh=fsdp=8", "--param_dtype=float32",
       f"--coordinator_address=localhost:{port}", "--num_processes=2",
       f"--process_id={i}"], cwd=ROOT, env=env, stdout=subprocess.PIPE,
      stderr=subprocess.STDOUT, text=True) for i in range(2)]
  logs = [p.communicate(timeout=600)[0] for p in procs]
  for p, log in zip(procs, logs, strict=True):
    assert p.returncode == 0, log[-3000:]
  assert "on mesh {'data': 1, 'fsdp': 8, 'model': 1} (all processes)" in (
      logs[0]), logs[0][-3000:]
  one = tmp_path / "one"
  benchmark.generate_benchmark("dpg", str(path), car_export,
                               tokenizer_export, str(one), num_images=2,
                               batch_size=4, param_dtype="float32")
  for i in range(3):
    np.testing.assert_array_equal(
        np.load(out / "tokens" / f"{i:05d}.npy"),
        np.load(one / "tokens" / f"{i:05d}.npy"))
  assert sorted(os.listdir(out)) == sorted(os.listdir(one))
