"""Hugging Face Qwen3 checkpoints: sharded lazy loading, streamed export.

`from_hf` reads config.json and the safetensors files of a local checkpoint
directory. Each device's slice of each tensor is read straight from the file
(a memory map: only the bytes of that slice are touched), on every process
for its own devices only, so a model never passes whole through one host or
one device. bf16/fp16 weights are upcast to the float32 master weights the
trainer updates unless `param_dtype` is overridden.

`to_hf` writes one tensor at a time: all processes gather it, process 0
appends it to the safetensors file, in the dtype asked for.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import struct
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils

from cvqcar.car import qwen3

HF_CONFIG = "config.json"
HF_WEIGHTS = "model.safetensors"
HF_INDEX = "model.safetensors.index.json"
_ST_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16,
              "BF16": jnp.bfloat16}
_ST_NAMES = {np.dtype(v): k for k, v in _ST_DTYPES.items()}
_SHARD_BYTES = 5 * 2**30  # transformers' default max_shard_size


@dataclasses.dataclass(frozen=True)
class Tensor:
  """One of our variables and the HF tensor(s) it is made of."""

  path: tuple[str, ...]  # in nnx.state(Qwen3)
  hf_names: tuple[str, ...]  # one per layer when stacked
  transposed: bool  # HF stores Linear kernels as [out, in]
  stacked: bool  # our array has a leading [layers] axis


def tensors(config: qwen3.Qwen3Config, prefix: str = "model."
            ) -> list[Tensor]:
  """Every Qwen3 parameter and its Hugging Face name(s)."""
  layers = range(config.num_hidden_layers)
  out = [Tensor(("embed_tokens", "embedding"),
                (prefix + "embed_tokens.weight",), False, False)]
  layer_params = [
      (("self_attn", f"{n}", "kernel"), f"self_attn.{n}.weight", True)
      for n in ("q_proj", "k_proj", "v_proj", "o_proj")]
  layer_params += [
      (("self_attn", "q_norm", "weight"), "self_attn.q_norm.weight", False),
      (("self_attn", "k_norm", "weight"), "self_attn.k_norm.weight", False)]
  layer_params += [(("mlp", n, "kernel"), f"mlp.{n}.weight", True)
                   for n in ("gate_proj", "up_proj", "down_proj")]
  layer_params += [
      (("input_layernorm", "weight"), "input_layernorm.weight", False),
      (("post_attention_layernorm", "weight"),
       "post_attention_layernorm.weight", False)]
  for path, name, transposed in layer_params:
    out.append(Tensor(("layers", *path),
                      tuple(f"{prefix}layers.{i}.{name}" for i in layers),
                      transposed, True))
  out.append(Tensor(("norm", "weight"), (prefix + "norm.weight",), False,
                    False))
  if not config.tie_word_embeddings:
    # Qwen3ForCausalLM keeps the head outside the `model.` trunk.
    out.append(Tensor(("lm_head", "kernel"), ("lm_head.weight",), True,
                      False))
  return out


class SafetensorsFile:
  """Reads slices of the tensors of one .safetensors file via a memmap."""

  def __init__(self, path: str):
    self.path = path
    with open(path, "rb") as f:
      (size,) = struct.unpack("<Q", f.read(8))
      header = json.loads(f.read(size))
    header.pop("__metadata__", None)
    self.header = header
    self.data_start = 8 + size

  def shape(self, name: str) -> tuple[int, ...]:
    return tuple(self.header[name]["shape"])

  def read(self, name: str, index: tuple[slice, ...]) -> np.ndarray:
    """tensor[index], reading only those bytes."""
    info = self.header[name]
    if info["dtype"] not in _ST_DTYPES:
      raise ValueError(f"{self.path}: tensor {name!r} has dtype"
                       f" {info['dtype']}; expected one of"
                       f" {sorted(_ST_DTYPES)}")
    begin, _ = info["data_offsets"]
    data = np.memmap(self.path, dtype=_ST_DTYPES[info["dtype"]], mode="r",
                     offset=self.data_start + begin,
                     shape=tuple(info["shape"]))
    return np.array(data[index])


def open_checkpoint(directory: str) -> dict[str, SafetensorsFile]:
  """Tensor name -> the file holding it, for a single or sharded save."""
  index_path = os.path.join(directory, HF_INDEX)
  single = os.path.join(directory, HF_WEIGHTS)
  if os.path.exists(index_path):
    with open(index_path) as f:
      weight_map = json.load(f)["weight_map"]
    files = {}
    for name, file in weight_map.items():
      path = os.path.join(directory, file)
      if path not in files:
        if not os.path.exists(path):
          raise FileNotFoundError(
              f"{index_path} puts tensor {name!r} in shard {file!r}, but"
              f" {path} does not exist; the checkpoint is incomplete")
        files[path] = SafetensorsFile(path)
    return {name: files[os.path.join(directory, file)]
            for name, file in weight_map.items()}
  if not os.path.exists(single):
    raise FileNotFoundError(f"{directory} has neither {HF_WEIGHTS} nor"
                            f" {HF_INDEX}; expected a Hugging Face"
                            " safetensors checkpoint")
  f = SafetensorsFile(single)
  return dict.fromkeys(f.header, f)


def read_config(directory: str, **overrides) -> qwen3.Qwen3Config:
  """The checkpoint's config; weights load as float32 master weights unless
  `param_dtype` is overridden (`dtype`, the compute dtype, is the file's)."""
  path = os.path.join(directory, HF_CONFIG)
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path} not found; expected a Hugging Face"
                            " checkpoint directory")
  with open(path) as f:
    return qwen3.Qwen3Config.from_hf_dict(
        json.load(f), **{"param_dtype": "float32", **overrides})


def _normalise(index, shape) -> tuple[slice, ...]:
  index = tuple(index) + (slice(None),) * (len(shape) - len(tuple(index)))
  return tuple(slice(*s.indices(n)) for s, n in zip(index, shape,
                                                    strict=True))


def load_state(directory: str, config: qwen3.Qwen3Config,
               shardings: Mapping[tuple[str, ...], jax.sharding.Sharding]
               | None = None) -> nnx.State:
  """The nnx.State of Qwen3(config) read from `directory`.

  `shardings` maps a parameter path (e.g. ('layers', 'mlp', 'up_proj',
  'kernel')) to its sharding; missing paths go to the first local device.
  Each array is assembled with jax.make_array_from_callback, which asks only
  for the slices this process's devices hold.
  """
  files = open_checkpoint(directory)
  # Qwen3Model checkpoints (embedding models) drop the `model.` prefix.
  prefix = "" if ("embed_tokens.weight" in files and
                  "model.embed_tokens.weight" not in files) else "model."
  wanted = tensors(config, prefix)
  missing = [n for t in wanted for n in t.hf_names if n not in files]
  if missing:
    raise KeyError(f"{directory} lacks tensor {missing[0]!r} ({len(missing)}"
                   f" missing in all) needed by {config}")
  used = {n for t in wanted for n in t.hf_names}
  unused = sorted(set(files) - used - {"lm_head.weight"})
  if unused:
    logging.warning("%s: ignoring %d tensors not in Qwen3, e.g. %s",
                    directory, len(unused), unused[:3])
  model = nnx.eval_shape(lambda: qwen3.Qwen3(config, rngs=nnx.Rngs(0)))
  abstract = dict(nnx.to_flat_state(nnx.state(model)))
  shardings = dict(shardings or {})
  default = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  flat = []
  for t in wanted:
    variable = abstract[t.path]
    shape = variable.get_value().shape
    one = shape[1:] if t.stacked else shape
    hf_shape = one[::-1] if t.transposed else one
    for name in t.hf_names:
      if files[name].shape(name) != hf_shape:
        raise ValueError(
            f"tensor {name!r} in {files[name].path} has shape"
            f" {files[name].shape(name)}; expected {hf_shape} for {config}")
    value = jax.make_array_from_callback(
        shape, shardings.get(t.path, default),
        _slice_reader(t, files, shape, config.param_dtype))
    flat.append((t.path, variable.replace(value)))
  return nnx.from_flat_state(flat)


def _slice_reader(t: Tensor, files, shape, dtype) -> Callable:
  cache = {}  # replicas of one slice on several devices are read once

  def read(index):
    index = _normalise(index, shape)
    key = tuple((s.start, s.stop, s.step) for s in index)
    if key not in cache:
      names = [t.hf_names[i] for i in range(*index[0].indices(shape[0]))
               ] if t.stacked else t.hf_names
      inner = index[1:] if t.stacked else index
      parts = []
      for name in names:
        part = files[name].read(name, inner[::-1] if t.transposed else inner)
        parts.append(part.T if t.transposed else part)
      array = np.stack(parts) if t.stacked else parts[0]
      cache[key] = array.astype(jnp.dtype(dtype))
    return cache[key]

  return read


def from_hf(directory: str, shardings=None, **overrides
            ) -> tuple[qwen3.Qwen3, qwen3.Qwen3Config]:
  """Loads a local Hugging Face Qwen3 checkpoint (config.json + safetensors).

  `overrides` replace config fields (e.g. dtype='float32' to compute in
  float32, remat='full'); `shardings` as in load_state. Nothing downloads.
  """
  config = read_config(directory, **overrides)
  model = nnx.eval_shape(lambda: qwen3.Qwen3(config, rngs=nnx.Rngs(0)))
  graphdef = nnx.graphdef(model)
  return nnx.merge(graphdef, load_state(directory, config, shardings)), config


def _gather(x: jax.Array) -> np.ndarray:
  """The whole array on this host; every process must call it."""
  if x.is_fully_addressable:
    return np.asarray(jax.device_get(x))
  return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def to_hf(model: qwen3.Qwen3, config: qwen3.Qwen3Config, directory: str,
          max_shard_bytes: int = _SHARD_BYTES) -> None:
  """Writes config.json and safetensors files for transformers to load.

  Tensors are stored in config.param_dtype, so float32 master weights export
  to bfloat16 with dataclasses.replace(config, param_dtype='bfloat16'). One
  tensor is gathered at a time; process 0 writes. Above `max_shard_bytes`
  the weights split into model-0000i-of-0000n.safetensors plus an index.
  """
  arch = dict(dtype="float32", param_dtype="float32", scan_layers=True,
              remat="none", attention="auto")
  if (dataclasses.replace(config, **arch) !=
      dataclasses.replace(model.config, **arch)):
    raise ValueError(f"config {config} does not describe the model, built"
                     f" from {model.config}")
  dtype = np.dtype(jnp.dtype(config.param_dtype))
  state = dict(nnx.to_flat_state(nnx.state(model)))
  entries = []  # (hf name, variable, layer or None, transposed, hf shape)
  for t in tensors(config):
    shape = state[t.path].get_value().shape
    one = shape[1:] if t.stacked else shape
    for i, name in enumerate(t.hf_names):
      entries.append((name, state[t.path], i if t.stacked else None,
                      t.transposed, one[::-1] if t.transposed else one))
  files, size = [[]], 0
  for entry in entries:
    nbytes = int(np.prod(entry[4])) * dtype.itemsize
    if files[-1] and size + nbytes > max_shard_bytes:
      files.append([])
      size = 0
    files[-1].append(entry)
    size += nbytes
  names = [HF_WEIGHTS] if len(files) == 1 else [
      f"model-{i + 1:05d}-of-{len(files):05d}.safetensors"
      for i in range(len(files))]
  writer = jax.process_index() == 0
  if writer:
    os.makedirs(directory, exist_ok=True)
  for file_name, file_entries in zip(names, files, strict=True):
    _write_file(os.path.join(directory, file_name), file_entries, dtype,
                writer)
  if not writer:
    return
  if len(files) > 1:
    weight_map = {e[0]: n for n, es in zip(names, files, strict=True)
                  for e in es}
    total = sum(int(np.prod(e[4])) * dtype.itemsize for e in entries)
    with open(os.path.join(directory, HF_INDEX), "w") as f:
      json.dump({"metadata": {"total_size": total},
                 "weight_map": weight_map}, f, indent=2)
  with open(os.path.join(directory, HF_CONFIG), "w") as f:
    json.dump(config.to_hf_dict(), f, indent=2)


def _write_file(path: str, entries, dtype: np.dtype, writer: bool) -> None:
  header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
  offset = 0
  for name, _, _, _, shape in entries:
    nbytes = int(np.prod(shape)) * dtype.itemsize
    header[name] = {"dtype": _ST_NAMES[dtype], "shape": list(shape),
                    "data_offsets": [offset, offset + nbytes]}
    offset += nbytes
  blob = json.dumps(header, separators=(",", ":")).encode()
  blob += b" " * (-len(blob) % 8)  # data starts 8-byte aligned
  f = open(path + ".tmp", "wb") if writer else None
  try:
    if f:
      f.write(struct.pack("<Q", len(blob)) + blob)
    for _, variable, layer, transposed, _ in entries:
      value = variable.get_value()
      array = _gather(value if layer is None else value[layer])
      if f:
        array = array.astype(dtype)
        f.write(np.ascontiguousarray(array.T if transposed else array)
                .tobytes())
  finally:
    if f:
      f.close()
  if f:
    os.replace(path + ".tmp", path)
