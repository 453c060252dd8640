"""Device meshes from the config; logical parameter axes to NamedShardings.

Every parameter carries `logical_axes` metadata (e.g. a conv kernel is
(None, None, 'conv_in', 'conv_out')). `config.logical_axis_rules` maps those
names to mesh axes, so the same model runs data-parallel, FSDP or
tensor-parallel by changing only the config.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import jax
import numpy as np
from flax import nnx
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

if TYPE_CHECKING:  # annotations only: the steps run without it
  import ml_collections

MESH_AXES = ("data", "fsdp", "model")
# The batch is split over every data-parallel axis (FSDP is data parallel).
BATCH_AXES = ("data", "fsdp")

# Default rules: FSDP shards weights over input widths and the code vectors,
# tensor parallelism shards output widths and the codes.
DEFAULT_RULES = (
    ("conv_in", "fsdp"),
    ("conv_out", "model"),
    ("codes", "model"),
    ("code_dim", "fsdp"),
    ("norm", None),
)


def axes(init, *names):
  """An initializer whose Variable records logical axis names."""
  return nnx.with_metadata(init, logical_axes=tuple(names))


def _axis_sizes(cfg: ml_collections.ConfigDict | None, num: int,
                what: str) -> list[int]:
  sizes = [int((cfg or {}).get(a, 1)) for a in MESH_AXES]
  if sizes.count(-1) > 1:
    raise ValueError(f"{what} may have one -1 axis, got {dict(cfg)}")
  known = math.prod(s for s in sizes if s != -1)
  if -1 in sizes:
    if num % known:
      raise ValueError(f"{what} {dict(cfg)}: {num} devices do not divide by"
                       f" the fixed axes' product {known}")
    sizes[sizes.index(-1)] = num // known
  if math.prod(sizes) != num:
    raise ValueError(f"{what} {dict(zip(MESH_AXES, sizes, strict=True))}"
                     f" needs {math.prod(sizes)} devices, found {num}")
  return sizes


def make_mesh(config: ml_collections.ConfigDict,
              devices: Sequence[jax.Device] | None = None) -> Mesh:
  """Mesh ('data', 'fsdp', 'model') from config.mesh (within a slice, ICI)
  times config.dcn_mesh (across slices/hosts, DCN); one -1 is auto-filled.
  """
  devices = list(jax.devices() if devices is None else devices)
  dcn_cfg = config.get("dcn_mesh")
  num_slices = math.prod(int(v) for v in (dcn_cfg or {}).values()) or 1
  if len(devices) % num_slices:
    raise ValueError(f"config.dcn_mesh {dict(dcn_cfg)} does not divide the"
                     f" {len(devices)} devices")
  dcn = _axis_sizes(dcn_cfg, num_slices, "config.dcn_mesh")
  ici = _axis_sizes(config.mesh, len(devices) // num_slices, "config.mesh")
  if num_slices > 1:
    grid = mesh_utils.create_hybrid_device_mesh(ici, dcn, devices=devices)
  else:
    grid = mesh_utils.create_device_mesh(ici, devices=devices)
  batch_ways = math.prod(i * d for i, d, a in zip(ici, dcn, MESH_AXES,
                                                   strict=True)
                         if a in BATCH_AXES)
  if config.batch_size % batch_ways:
    raise ValueError(f"config.batch_size={config.batch_size} is not divisible"
                     f" by the {batch_ways} data-parallel devices"
                     " (mesh data x fsdp)")
  return Mesh(grid, MESH_AXES,
              axis_types=(jax.sharding.AxisType.Auto,) * len(MESH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_sharded(mesh: Mesh) -> NamedSharding:
  """Leading (batch) axis split over the data-parallel mesh axes."""
  return NamedSharding(mesh, P(tuple(a for a in BATCH_AXES
                                     if a in mesh.axis_names)))


def constrain_batch(x: jax.Array) -> jax.Array:
  """Pins an activation's leading (batch) axis to the data-parallel mesh
  axes of the mesh in context (jax.set_mesh); a no-op without one.

  Without it, XLA may resolve the clash between FSDP-sharded weights and a
  batch sharded over the same axis by gathering the activations: every
  device then holds the global batch's activations.
  """
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return x
  axes = tuple(a for a in BATCH_AXES
               if a in mesh.axis_names and mesh.shape[a] > 1)
  if not axes or x.shape[0] % math.prod(mesh.shape[a] for a in axes):
    return x
  return jax.lax.with_sharding_constraint(x, P(axes))


def constrain_axes(x: jax.Array, *dims) -> jax.Array:
  """Pins x's sharding in the mesh in context, one entry per dim: None
  (unsharded), a mesh axis name, or a tuple of them ("batch" stands for
  BATCH_AXES). An axis absent from the mesh, of size 1, taken by an earlier
  dim, or not dividing its dim is left out; a no-op without a mesh.
  """
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return x
  if len(dims) != x.ndim:
    raise ValueError(f"{len(dims)} dims {dims} for an array of shape"
                     f" {x.shape}")
  used, spec = set(), []
  for dim, names in zip(x.shape, dims, strict=True):
    names = BATCH_AXES if names == "batch" else (
        () if names is None else (names,) if isinstance(names, str)
        else tuple(names))
    names = tuple(a for a in names if a in mesh.axis_names
                  and mesh.shape[a] > 1 and a not in used)
    if names and dim % math.prod(mesh.shape[a] for a in names) == 0:
      used.update(names)
      spec.append(names)
    else:
      spec.append(None)
  return jax.lax.with_sharding_constraint(x, P(*spec))


def rules_from_config(config) -> dict[str, tuple[str, ...]]:
  rules = config.get("logical_axis_rules", DEFAULT_RULES)
  out = {}
  for name, target in rules:
    if target is None:
      out[name] = ()
    elif isinstance(target, str):
      out[name] = (target,)
    else:
      out[name] = tuple(target)
  return out


def logical_to_spec(logical: Sequence[str | None], shape: Sequence[int],
                    mesh: Mesh, rules: dict[str, tuple[str, ...]]) -> P:
  """PartitionSpec for one array. A dim that the mesh axes do not divide,
  or whose axes an earlier dim already took, stays unsharded."""
  if len(logical) != len(shape):
    raise ValueError(f"logical axes {tuple(logical)} do not match shape"
                     f" {tuple(shape)}")
  used, spec = set(), []
  for name, dim in zip(logical, shape, strict=True):
    if name is not None and name not in rules:
      raise ValueError(f"logical axis {name!r} has no rule in"
                       f" config.logical_axis_rules {sorted(rules)}")
    targets = tuple(a for a in rules.get(name, ()) if a in mesh.axis_names
                    and mesh.shape[a] > 1 and a not in used)
    ways = math.prod(mesh.shape[a] for a in targets)
    if targets and dim % ways == 0:
      used.update(targets)
      spec.append(targets[0] if len(targets) == 1 else targets)
    else:
      if targets:
        logging.debug("dim %d of %s not divisible by %s", dim, logical,
                      targets)
      spec.append(None)
  while spec and spec[-1] is None:  # P(None, None) and P() are one sharding
    spec.pop()
  return P(*spec)


def _is_variable(x) -> bool:
  return isinstance(x, nnx.Variable)


def state_shardings(abstract_state: Any, mesh: Mesh, config) -> Any:
  """NamedShardings for a tree holding nnx Variables (params, EMA, optimizer
  moments) and plain leaves (step counters: replicated)."""
  rules = rules_from_config(config)

  def one(x):
    if _is_variable(x):
      names = x.get_metadata().get("logical_axes")
      shape = np.shape(x.get_value())
      spec = P() if names is None else logical_to_spec(names, shape, mesh,
                                                        rules)
      return x.replace(NamedSharding(mesh, spec))
    return replicated(mesh)

  return jax.tree.map(one, abstract_state, is_leaf=_is_variable)


def global_batch(local: dict[str, np.ndarray], mesh: Mesh) -> dict[str, Any]:
  """Stitches each process's local slice into global arrays."""
  sharding = batch_sharded(mesh)
  return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
          for k, v in local.items()}
