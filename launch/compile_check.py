"""Compiles the train step or the sampler ahead of time to catch OOM configs.

Needs: the venv from the README quick start; nothing is run or allocated
beyond the compile. Lower and compile the sharded train step of a config
(the tokenizer's, or CAR's stage I or II when config.trainer is 'car') for
a mesh of N devices, print its per-device memory, and exit 1 when the peak
estimate does not fit in --device_memory_gib, all before a pod is reserved:

  python launch/compile_check.py --config=configs/cvq_tokenizer.py:tiny \
      --num_devices=8 --device_memory_gib=16
  python launch/compile_check.py --config=configs/cvq_tokenizer.py \
      --num_devices=256 --config.mesh.fsdp=8 --device_memory_gib=16
  python launch/compile_check.py --config=configs/car_stage2.py:llm=4b \
      --num_devices=8 --config.mesh.fsdp=8 --config.batch_size=64 \
      --device_memory_gib=80

--job=sample compiles CAR's sampler instead (`sampling.generate`: prefill
and all C decoding steps, conditional and unconditional rows of
classifier-free guidance in one batch) for config.batch_size prompts, on
weights cast to --param_dtype and a KV cache in the compute dtype, split
over the batch (data, fsdp) and kv heads (model) axes:

  python launch/compile_check.py --job=sample \
      --config=configs/car_stage2.py:llm=8b --num_devices=8 \
      --config.mesh.fsdp=8 --config.batch_size=64 --device_memory_gib=16

With --num_devices=N the devices are N fake CPU devices, so XLA's CPU
compiler stands in for the target's: buffer sizes (parameters, optimizer
state, batch shards) are exact, temporaries an estimate of the TPU/GPU ones.
Without it the script compiles for this machine's devices (run it on one
host of the target type for the target compiler's own numbers).
"""

from __future__ import annotations

import json
import math
import os
import sys
import tempfile
import time


def _num_devices_from_argv(argv: list[str]) -> int | None:
  """--num_devices=N (or --num_devices N), read before absl parses flags."""
  for i, arg in enumerate(argv):
    if arg.startswith("--num_devices="):
      value = arg.split("=", 1)[1]
    elif arg == "--num_devices" and i + 1 < len(argv):
      value = argv[i + 1]
    else:
      continue
    if not value.isdigit() or int(value) < 1:
      sys.exit(f"--num_devices must be a positive integer, got {value!r}")
    return int(value)
  return None


# XLA reads its flags when JAX first starts a backend, so the fake devices
# must be requested before `import jax`.
_FAKE_DEVICES = _num_devices_from_argv(sys.argv)
if _FAKE_DEVICES is not None:
  os.environ["XLA_FLAGS"] = (
      os.environ.get("XLA_FLAGS", "") +
      f" --xla_force_host_platform_device_count={_FAKE_DEVICES}")
  # Fake devices exist only on the CPU platform; keep a local GPU/TPU out.
  os.environ["JAX_PLATFORMS"] = "cpu"
sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from cvqcar import perf, sharding  # noqa: E402
from cvqcar.tokenizer import trainer as tokenizer_trainer  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Training config file (a get_config(arg) module).",
    lock_config=True)
flags.DEFINE_integer(
    "num_devices", None, "Compile for this many fake CPU devices (the"
    " target mesh's device count); default: this machine's devices.")
_DEVICE_MEMORY_GIB = flags.DEFINE_float(
    "device_memory_gib", 16.0, "Memory of one target device in GiB (TPU v5e"
    " 16, v4 / v6e 32, v5p 95, H100 80); a larger peak estimate fails.")

_JOB = flags.DEFINE_enum(
    "job", "train", ["train", "sample"], "What to compile: the train step,"
    " or CAR's sampler (prefill and C decoding steps) at config.batch_size"
    " prompts.")
_PARAM_DTYPE = flags.DEFINE_enum(
    "param_dtype", "bfloat16", ["bfloat16", "float32"], "--job=sample: the"
    " dtype the weights are cast to for sampling.")
_LPIPS = flags.DEFINE_bool(
    "lpips", True, "Tokenizer: count the LPIPS loss the config asks for"
    " (loss.perceptual_weight > 0) even with no weight file, with random"
    " VGG16 weights of the real shapes (memory and FLOPs do not depend on"
    " the values); --nolpips compiles without it unless a file is given.")
_JSON_OUT = flags.DEFINE_string(
    "json_out", None, "Also write the memory figures (bytes), the compile"
    " time and the verdict to this JSON file.")

_MIB = 2**20


def _count(tree) -> float:
  return sum(x.size for x in jax.tree.leaves(tree)) / 1e6


def _compile_tokenizer(config):
  lpips_note = ""
  if (_LPIPS.value and config.loss.perceptual_weight > 0
      and not config.loss.perceptual_weights):
    from flax import nnx

    from cvqcar.tokenizer import lpips

    with tempfile.TemporaryDirectory() as tmp:
      config.loss.perceptual_weights = os.path.join(tmp, "lpips_random.npz")
      lpips.LPIPS(rngs=nnx.Rngs(0)).save(config.loss.perceptual_weights)
      trainer = tokenizer_trainer.Trainer(config)  # reads the weights
    lpips_note = " (LPIPS counted, random weights)"
  else:
    trainer = tokenizer_trainer.Trainer(config)
  # Trainer checked the mesh and the batch's divisibility.
  mesh = trainer.mesh
  batch_size, res = config.batch_size, config.model.resolution
  data_sharding = sharding.batch_sharded(mesh)
  batch = {
      "image": jax.ShapeDtypeStruct((batch_size, res, res, 3), jnp.float32,
                                    sharding=data_sharding),
      "skipped": jax.ShapeDtypeStruct((batch_size,), jnp.int32,
                                      sharding=data_sharding),
  }
  with jax.set_mesh(mesh):
    compiled = trainer.train_step.lower(
        trainer.abstract_state, batch, trainer.step_key,
        trainer.perceptual).compile()
  state = trainer.abstract_state
  summary = (f"parameters: {_count(state.params):.2f}M generator,"
             f" {_count(state.disc_params):.2f}M discriminator; batch"
             f" {batch_size} x {res}x{res}x3{lpips_note}")
  return compiled, mesh, summary


def _compile_car(config):
  """The CAR train step (stage I or II) on abstract state and batch."""
  import dataclasses

  import ml_collections
  from flax import nnx

  from cvqcar.car import state as car_state
  from cvqcar.car import trainer as car_trainer
  from cvqcar.tokenizer import model as tokenizer_lib

  config = ml_collections.ConfigDict(config.to_dict())
  llm_cfg = car_state.resolve_llm_config(config)
  config.llm_config = dataclasses.asdict(llm_cfg)
  mesh = sharding.make_mesh(config)
  graphdef, abstract = car_state.abstract_state(config)
  shardings = sharding.state_shardings(abstract, mesh, config)
  state = car_state.with_shardings(abstract, shardings)
  tokenizer = nnx.eval_shape(lambda: tokenizer_lib.Tokenizer(
      config.tokenizer, rngs=nnx.Rngs(0)))
  tok_graphdef, tok_state = nnx.split(tokenizer)
  rep = sharding.replicated(mesh)
  tok_state = jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=rep),
      tok_state)
  b, data = config.batch_size, sharding.batch_sharded(mesh)
  _, channels, _ = car_state.tokenizer_shape(config.tokenizer)
  res = config.tokenizer.resolution
  batch = {"text": ((b, config.max_text_len), jnp.int32),
           "text_mask": ((b, config.max_text_len), jnp.int32)}
  if config.data.pretokenized:
    batch["tokens"] = ((b, channels), jnp.int32)
  else:
    batch["image"] = ((b, res, res, 3), jnp.float32)
  batch = {k: jax.ShapeDtypeStruct(*v, sharding=data)
           for k, v in batch.items()}
  step_fn = car_trainer.make_train_step(config, graphdef, tok_graphdef,
                                        shardings, mesh)
  key = jax.random.key(0)
  with jax.set_mesh(mesh):
    compiled = step_fn.lower(state, batch, key, tok_state).compile()
  frozen = _count(state.backbone) + _count(state.frozen)
  summary = (
      f"CAR stage {config.stage}: {_count(state.params):.1f}M trained,"
      f" {frozen:.1f}M frozen parameters ({llm_cfg.num_hidden_layers}"
      f" layers, compute {llm_cfg.dtype}, weights {llm_cfg.param_dtype},"
      f" remat {llm_cfg.remat}); batch {b} x"
      f" ({config.max_text_len} text + 1 + {channels} channel tokens)")
  return compiled, mesh, summary


def _compile_car_sampler(config):
  """CAR's sampler on abstract weights and prompts; refuses a mesh that
  the devices or the kv heads do not fit before anything compiles."""
  import dataclasses

  import ml_collections

  from cvqcar.car import sampling
  from cvqcar.car import state as car_state

  if config.get("trainer") != "car":
    sys.exit("compile_check: --job=sample needs a CAR config"
             f" (config.trainer 'car'), got {config.get('trainer')!r}")
  config = ml_collections.ConfigDict(config.to_dict())
  llm_cfg = car_state.resolve_llm_config(config)
  config.llm_config = dataclasses.asdict(llm_cfg)
  try:
    mesh = sharding.make_mesh(config)
  except ValueError as e:
    sys.exit(f"compile_check: {e}")
  model_ways = mesh.shape["model"]
  if llm_cfg.num_key_value_heads % model_ways:
    sys.exit(f"compile_check: the backbone's num_key_value_heads="
             f"{llm_cfg.num_key_value_heads} is not divisible by"
             f" config.mesh.model={model_ways}: the KV cache splits its kv"
             " heads over the model axis")
  graphdef, abstract = car_state.abstract_state(config)
  # The optimizer state stays behind: sampling reads only the weights.
  states = (abstract.params, abstract.backbone, abstract.frozen)
  shardings = sharding.state_shardings(states, mesh, config)
  # A sampling copy of the weights, the codebook and head included, is the
  # trained tree cast once.
  dtype = jnp.dtype(_PARAM_DTYPE.value)
  cast = lambda x, s: jax.ShapeDtypeStruct(
      x.shape, dtype if jnp.issubdtype(x.dtype, jnp.floating) else x.dtype,
      sharding=s)
  states = jax.tree.map(cast, states, shardings)
  b, length = config.batch_size, config.max_text_len
  data = sharding.batch_sharded(mesh)
  text = jax.ShapeDtypeStruct((b, length), jnp.int32, sharding=data)
  # One key per prompt, as the sampling commands pass (sampling.sample_keys).
  keys = jax.ShapeDtypeStruct((b,), jax.random.key(0).dtype, sharding=data)
  s = config.sample
  with jax.set_mesh(mesh):
    compiled = sampling.generate.lower(
        graphdef, states, text, text, keys, temperature=s.temperature,
        top_k=s.top_k, top_p=s.top_p, cfg_scale=s.cfg_scale,
        cfg_schedule=s.get("cfg_schedule", "constant")).compile()
  _, channels, _ = car_state.tokenizer_shape(config.tokenizer)
  rows = b if s.cfg_scale == 1.0 else 2 * b
  slots = length + 1 + channels
  cache = (2 * llm_cfg.num_hidden_layers * rows * slots *
           llm_cfg.num_key_value_heads * llm_cfg.head_dim *
           jnp.dtype(llm_cfg.dtype).itemsize)
  batch_ways = mesh.shape["data"] * mesh.shape["fsdp"]
  per_device = cache // (batch_ways * model_ways)
  summary = (
      f"CAR sampler (stage {config.stage}): {_count(states):.1f}M"
      f" parameters in {dtype.name} ({llm_cfg.num_hidden_layers} layers,"
      f" compute {llm_cfg.dtype}); {b} prompts x {rows // b} rows (cfg_scale"
      f" {s.cfg_scale:g}) x ({length} text + 1 + {channels} channel tokens);"
      f" KV cache {cache / _MIB:.1f} MiB in {llm_cfg.dtype}, split"
      f" {batch_ways} ways over the batch and {model_ways} over kv heads"
      f" ({per_device / _MIB:.1f} MiB per device)")
  held = sum(math.prod(x.sharding.shard_shape(x.shape)) * x.dtype.itemsize
             for x in jax.tree.leaves((states, text, text)))
  return compiled, mesh, summary, {"kv_cache": cache,
                                   "kv_cache_per_device": per_device,
                                   "held_argument": held}


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  config = _CONFIG.value
  if _FAKE_DEVICES is not None and jax.device_count() != _FAKE_DEVICES:
    sys.exit(f"--num_devices={_FAKE_DEVICES} but JAX sees"
             f" {jax.device_count()} devices; is another"
             " --xla_force_host_platform_device_count in XLA_FLAGS?")
  t0 = time.perf_counter()
  extra = {}
  if _JOB.value == "sample":
    compiled, mesh, summary, extra = _compile_car_sampler(config)
  elif config.get("trainer") == "car":
    compiled, mesh, summary = _compile_car(config)
  else:
    compiled, mesh, summary = _compile_tokenizer(config)
  compile_s = time.perf_counter() - t0
  axes = " ".join(f"{k}={v}" for k, v in mesh.shape.items())
  kind = mesh.devices.flat[0].device_kind
  print(f"mesh: {axes} ({mesh.devices.size} x {kind})")
  print(summary)
  stats = compiled.memory_analysis()
  if stats is None:
    sys.exit(f"the {jax.default_backend()} backend reports no memory"
             " analysis; run with --num_devices=N for fake CPU devices")
  sizes = {
      "argument": stats.argument_size_in_bytes,
      "output": stats.output_size_in_bytes,
      "temp": stats.temp_size_in_bytes,
      "generated code": stats.generated_code_size_in_bytes,
      "alias": stats.alias_size_in_bytes,
  }
  print("memory per device (MiB):")
  for name, size in sizes.items():
    print(f"  {name:<15}{size / _MIB:12.2f}")
  # The donated state is both argument and output; alias counts it once.
  peak = (sizes["argument"] + sizes["output"] + sizes["temp"] -
          sizes["alias"])
  # jit drops the arguments a program never reads (the sampler: an untied
  # lm_head), yet the device still holds them.
  unread = max(0, extra.get("held_argument", 0) - sizes["argument"])
  formula = "argument + output + temp - alias"
  if unread:
    sizes["unread argument"] = unread
    print(f"  {'unread argument':<15}{unread / _MIB:12.2f}  (held, not read"
          " by the program)")
    peak += unread
    formula += " + unread"
  limit = _DEVICE_MEMORY_GIB.value * 2**30
  print(f"  {'peak estimate':<15}{peak / _MIB:12.2f}  ({formula}; limit"
        f" {limit / _MIB:g})")
  print(f"  lowered and compiled in {compile_s:.1f}s")
  flops = perf.compiled_flops(compiled)
  if flops:  # XLA's count for one device's share of the global batch
    extra["flops_per_device"] = flops
    if _JOB.value != "sample":
      per_example = flops * mesh.devices.size / config.batch_size
      extra["flops_per_example"] = per_example
      print(f"  FLOPs per device {flops:.4g}, per example {per_example:.4g}"
            " (XLA's count)")
  if _JSON_OUT.value:
    with open(_JSON_OUT.value, "w") as f:
      json.dump({**sizes, "peak": peak, "limit": limit, "fits": peak <= limit,
                 "compile_s": compile_s, "mesh": dict(mesh.shape),
                 "job": _JOB.value, "summary": summary, **extra}, f,
                indent=2)
  what = "weights and KV cache" if _JOB.value == "sample" else "state"
  if peak > limit:
    sys.exit(f"compile_check: estimated peak {peak / _MIB:.2f} MiB per device"
             f" exceeds --device_memory_gib={_DEVICE_MEMORY_GIB.value:g}"
             f" ({limit / _MIB:g} MiB): lower config.batch_size, shard"
             f" the {what} (config.mesh.fsdp / config.mesh.model) or use"
             " more devices")
  print(f"compile_check: OK, {100 * peak / limit:.1f}% of"
        f" {_DEVICE_MEMORY_GIB.value:g} GiB per device")


if __name__ == "__main__":
  flags.mark_flags_as_required(["config"])
  app.run(main)
