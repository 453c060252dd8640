"""CAR sampling on a device mesh: an export read onto it, prompts over it.

A `Sampler` holds a CAR model's weights on a mesh ('data', 'fsdp',
'model'), cast once to the sampling dtype (bfloat16 by default), and runs
`sampling.generate` with the prompts split over the batch axes (data x
fsdp) and the KV cache over the batch axes and kv heads ('model'). A mesh
is one of:
  - this process's devices (the default: all of them over 'data'; a
    smaller mesh takes the first ones). In a multi-process job each process
    then samples its own prompts on its own devices.
  - every device of the job, when the mesh needs more than one process's
    devices (a model too large for one host): all processes then sample the
    same prompts together.

  sampler = Sampler.load("exports/car2", mesh="fsdp=4,model=2")
  tokens_bc = sampler.tokens(ids_bl, mask_bl, keys_b, cfg_scale=3.0)

Greedy tokens do not depend on the mesh (up to the backend's arithmetic:
a sharded matmul adds its partial sums in another order).
"""

from __future__ import annotations

import logging
import math
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx
from jax.experimental import mesh_utils, multihost_utils
from jax.sharding import AxisType, Mesh, NamedSharding

from cvqcar import checkpoint, sharding
from cvqcar.car import model as car_lib
from cvqcar.car import qwen3, sampling
from cvqcar.car import state as car_state

PARAM_DTYPES = ("bfloat16", "float32")
_PARTS = ("params", "backbone", "frozen")


def parse_mesh(spec: str) -> dict[str, int]:
  """'fsdp=4,model=2' -> {'data': -1, 'fsdp': 4, 'model': 2}: axes not
  named are 1, and 'data' (unless named) takes the devices left over."""
  sizes = {"data": -1, "fsdp": 1, "model": 1}
  named = set()
  for part in filter(None, (p.strip() for p in (spec or "").split(","))):
    axis, _, value = part.partition("=")
    axis = axis.strip()
    if axis not in sizes or not value.strip().lstrip("-").isdigit():
      raise ValueError(f"--mesh={spec!r}: expected comma-separated"
                       f" AXIS=SIZE with AXIS in {sharding.MESH_AXES}, e.g."
                       " 'fsdp=4,model=2'")
    if axis in named:
      raise ValueError(f"--mesh={spec!r} names {axis!r} twice")
    size = int(value)
    if size < 1 and size != -1:
      raise ValueError(f"--mesh={spec!r}: {axis}={size}; sizes are >= 1 (or"
                       " -1: the devices left over)")
    sizes[axis] = size
    named.add(axis)
  if list(sizes.values()).count(-1) > 1:
    raise ValueError(f"--mesh={spec!r} may have one -1 axis")
  return sizes


def _fill(sizes: dict[str, int], spec: str, local: int, total: int
          ) -> dict[str, int]:
  """The -1 axis filled from this process's devices, or from the job's
  when the fixed axes need more; raises naming the numbers."""
  known = math.prod(v for v in sizes.values() if v != -1)
  if -1 not in sizes.values():
    return dict(sizes)
  if local % known == 0:
    devices = local
  elif known > local and total % known == 0:
    devices = total
  else:
    raise ValueError(f"--mesh={spec!r}: its fixed axes need {known} devices,"
                     f" which divide neither this process's {local} devices"
                     f" nor the job's {total}")
  return {k: devices // known if v == -1 else v for k, v in sizes.items()}


def sampling_mesh(spec: str, num_kv_heads: int
                  ) -> tuple[Mesh, bool, Mesh | None]:
  """(mesh, spans_processes, load_mesh) for --mesh=`spec`, refused before
  anything loads when it does not fit the devices or the kv heads.

  load_mesh is set for a per-process mesh in a multi-process job: the
  same mesh on every process with a leading 'replica' axis over them, so
  one collective restore reads every process's copy (see `Sampler.load`).
  """
  local = jax.local_device_count()
  total = jax.device_count()
  sizes = _fill(parse_mesh(spec), spec, local, total)
  need = math.prod(sizes.values())
  model_ways = sizes["model"]
  if num_kv_heads % model_ways:
    raise ValueError(f"--mesh={spec!r}: model={model_ways} does not divide"
                     f" the backbone's {num_kv_heads} kv heads (the KV cache"
                     " splits kv heads over 'model')")
  shape = tuple(sizes[a] for a in sharding.MESH_AXES)
  if need <= local:
    if need < local:
      logging.info("sampling mesh %s: %d of this process's %d devices",
                   sizes, need, local)
    mesh = _mesh(jax.local_devices()[:need], shape)
    load = None
    if jax.process_count() > 1:
      by_process = [[d for d in jax.devices() if d.process_index == p][:need]
                    for p in range(jax.process_count())]
      grid = np.stack([_mesh(d, shape).devices for d in by_process])
      load = Mesh(grid, ("replica",) + sharding.MESH_AXES,
                  axis_types=(AxisType.Auto,) * grid.ndim)
    return mesh, False, load
  if need == total:
    return _mesh(jax.devices(), shape), True, None
  raise ValueError(
      f"--mesh={spec!r} needs {need} devices; this process has {local} and"
      f" the job {total}: a sampling mesh is at most this process's devices"
      f" or all {total} of the job's")


def _mesh(devices, shape) -> Mesh:
  try:
    grid = mesh_utils.create_device_mesh(shape, devices=devices)
  except (AssertionError, ValueError, NotImplementedError):
    grid = np.array(devices).reshape(shape)  # no physical layout known
  return Mesh(grid, sharding.MESH_AXES,
              axis_types=(AxisType.Auto,) * grid.ndim)


def _cast(dtype):
  def one(x):
    return jnp.dtype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else (
        x.dtype)
  return one


def restore_onto_mesh(path: str, parts: dict[str, Any], mesh: Mesh,
                      load_mesh: Mesh | None, config, param_dtype: str
                      ) -> dict[str, Any]:
  """The export at `path` restored straight onto `mesh` (`sampling_mesh`'s
  mesh and load_mesh): `parts` {name: abstract state} sharded by `config`'s
  logical rules, each device reading only its slices, float leaves cast
  to `param_dtype` as read."""
  if param_dtype not in PARAM_DTYPES:
    raise ValueError(f"param_dtype must be one of {PARAM_DTYPES}, got"
                     f" {param_dtype!r}")
  on = load_mesh or mesh
  cast = _cast(param_dtype)

  def target(abstract):
    shardings = sharding.state_shardings(abstract, mesh, config)
    return jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, cast(x),
                                          sharding=NamedSharding(on, s.spec)),
        abstract, shardings)

  restored = checkpoint.restore_export(
      path, {name: target(abstract) for name, abstract in parts.items()})
  return restored if load_mesh is None else to_local(restored, mesh)


def put_on_mesh(tree, mesh: Mesh, config, param_dtype: str | None = None):
  """An in-memory model's state (of this process) on `mesh`, sharded by
  `config`'s logical rules, float leaves cast to `param_dtype` (None: as
  they are)."""
  shardings = sharding.state_shardings(tree, mesh, config)
  cast = _cast(param_dtype) if param_dtype else (lambda x: x.dtype)

  def put(x, s):
    x = x if x.is_fully_addressable else x.addressable_data(0)
    return jax.device_put(x.astype(cast(x)), s)

  return jax.tree.map(put, tree, shardings)


def to_local(tree, mesh: Mesh):
  """Arrays of a mesh with a 'replica' axis over processes as arrays of
  this process's `mesh` (the same shards, no copy)."""
  def one(x):
    spec = x.sharding.spec
    target = NamedSharding(mesh, spec)
    by_device = {s.device: s.data for s in x.addressable_shards}
    return jax.make_array_from_single_device_arrays(
        x.shape, target, [by_device[d] for d in mesh.devices.flat])
  return jax.tree.map(one, tree)


class Sampler:
  """A CAR model's weights on a mesh, and batched sampling over it."""

  def __init__(self, graphdef, states, config: ml_collections.ConfigDict,
               mesh: Mesh, spans_processes: bool = False):
    self.graphdef, self.states = graphdef, states
    self.config, self.mesh = config, mesh
    self.spans_processes = spans_processes
    self.num_channels = car_state.tokenizer_shape(config.tokenizer)[1]

  @classmethod
  def load(cls, path: str, mesh: str = "",
           param_dtype: str = "bfloat16") -> Sampler:
    """The CAR export at `path` restored straight onto --mesh=`mesh` in
    `param_dtype`: each device reads only its slices, cast as read."""
    config = checkpoint.load_config(path)
    llm = qwen3.Qwen3Config(**config.llm_config)
    mesh_, spans, load_mesh = sampling_mesh(mesh, llm.num_key_value_heads)
    graphdef, abstract = car_state.abstract_state(config)
    restored = restore_onto_mesh(
        path, {k: getattr(abstract, k) for k in _PARTS}, mesh_, load_mesh,
        config, param_dtype)
    states = tuple(restored[k] for k in _PARTS)
    logging.info("CAR %s on mesh %s (%s) in %s", path, dict(mesh_.shape),
                 "all processes" if spans else "this process", param_dtype)
    return cls(graphdef, states, config, mesh_, spans)

  @classmethod
  def from_model(cls, model: car_lib.CAR, config: ml_collections.ConfigDict,
                 mesh: str = "", param_dtype: str | None = None
                 ) -> Sampler:
    """A model in memory (its `config` gives the sharding rules) put on
    --mesh=`mesh` of this process's devices, cast to `param_dtype` (None:
    as it is)."""
    mesh_, spans, _ = sampling_mesh(mesh,
                                    model.backbone.config.num_key_value_heads)
    if spans:
      raise ValueError(f"--mesh={mesh!r} spans processes: an in-memory model"
                       " samples on this process's devices; load an export"
                       " (Sampler.load) to sample across processes")
    graphdef, *states = nnx.split(model, nnx.Param, ...)
    return cls(graphdef, put_on_mesh(tuple(states), mesh_, config,
                                     param_dtype), config, mesh_)

  @property
  def batch_ways(self) -> int:
    """Devices the prompts are split over (data x fsdp)."""
    return math.prod(self.mesh.shape[a] for a in sharding.BATCH_AXES)

  def padded(self, rows: int) -> int:
    """`rows` rounded up to a multiple of the batch ways."""
    return -(-rows // self.batch_ways) * self.batch_ways

  def tokens(self, ids_bl, mask_bl, keys_b, **settings) -> np.ndarray:
    """Channel tokens int32 [B, C] for prompts (left-padded ids and mask
    [B, L]) and per-row keys [B] (`sampling.sample_keys`); settings are
    `sampling.generate`'s. Rows are padded to the batch ways and split
    over them; every process of a mesh across processes passes the same
    rows and gets all of them back."""
    ids_bl, mask_bl = np.asarray(ids_bl), np.asarray(mask_bl)
    keys = np.asarray(jax.random.key_data(keys_b))
    b = ids_bl.shape[0]
    pad = self.padded(b) - b
    if pad:  # empty prompts with their own (any) keys: rows never mix
      empty = np.zeros((pad,) + ids_bl.shape[1:], ids_bl.dtype)
      ids_bl = np.concatenate([ids_bl, empty])
      mask_bl = np.concatenate([mask_bl, empty.astype(mask_bl.dtype)])
      keys = np.concatenate([keys, np.repeat(keys[-1:], pad, axis=0)])
    rows = sharding.batch_sharded(self.mesh)
    text, mask, keys = (self._put(x, rows) for x in (ids_bl, mask_bl, keys))
    with jax.set_mesh(self.mesh):
      out = sampling.generate(self.graphdef, self.states, text, mask,
                              jax.random.wrap_key_data(keys), **settings)
    if self.spans_processes:
      out = multihost_utils.process_allgather(out, tiled=True)
    return np.asarray(out)[:b]

  def _put(self, x: np.ndarray, rows: NamedSharding) -> Any:
    if self.spans_processes:  # every process holds all rows: slice them
      return jax.make_array_from_callback(x.shape, rows, lambda i: x[i])
    return jax.device_put(x, rows)

