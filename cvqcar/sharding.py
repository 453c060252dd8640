"""Device mesh from the config and the shardings of batches and state."""

from __future__ import annotations

from typing import Any

import jax
import ml_collections
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

DATA_AXIS = "data"


def make_mesh(config: ml_collections.ConfigDict,
              devices: list[jax.Device] | None = None) -> Mesh:
  """A 1-D data-parallel mesh; `config.mesh.data = -1` takes every device."""
  devices = jax.devices() if devices is None else devices
  size = config.mesh.data
  if size == -1:
    size = len(devices)
  if size != len(devices):
    raise ValueError(f"config.mesh.data={config.mesh.data} does not match the"
                     f" {len(devices)} available devices")
  if config.batch_size % size:
    raise ValueError(f"config.batch_size={config.batch_size} is not divisible"
                     f" by the {size} devices on the data axis")
  grid = mesh_utils.create_device_mesh((size,), devices=devices)
  return Mesh(grid, (DATA_AXIS,),
              axis_types=(jax.sharding.AxisType.Auto,))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_sharded(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P(DATA_AXIS))


def global_batch(local: dict[str, np.ndarray], mesh: Mesh) -> dict[str, Any]:
  """Stitches each process's local slice into global arrays over `data`."""
  sharding = batch_sharded(mesh)
  return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
          for k, v in local.items()}
