"""DQ-Transformer sampling on a device mesh, the way CAR samples.

A `DQSampler` holds a DQ-Transformer's weights on a mesh ('data', 'fsdp',
'model') built as cvqcar.car.sampler builds CAR's (`sampling_mesh`: this
process's devices, or every device of the job), cast once to the sampling
dtype, and runs `transformer.generate` with the conditions split over the
batch axes (data x fsdp) and the weights sharded by the training config's
logical rules. Each row draws from its own key
(cvqcar.car.sampling.sample_keys), so a sample depends on its seed, prompt
and sample index alone: not on the mesh, the batch or the padding.

  sampler = DQSampler.load("exports/dqt_tiny", mesh="data=2,fsdp=2")
  keys = sampling.sample_keys(seed, prompt_ids, sample_ids)
  codes, positions, lengths = sampler.sample(cond, keys, cfg_scale=3.0)
"""

from __future__ import annotations

import logging
import math
from typing import Any

import jax
import ml_collections
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding

from cvqcar import checkpoint, sharding
from cvqcar.car import sampler as car_sampler
from cvqcar.dq import transformer as dq


class DQSampler:
  """A DQ-Transformer's weights on a mesh, and batched sampling over it."""

  def __init__(self, graphdef, params, config: ml_collections.ConfigDict,
               mesh, spans_processes: bool = False):
    self.graphdef, self.params = graphdef, params
    self.config, self.mesh = config, mesh
    self.spans_processes = spans_processes
    self.model_config = dq.DQConfig(**config.model.to_dict())

  @classmethod
  def load(cls, path: str, mesh: str = "",
           param_dtype: str = "float32") -> DQSampler:
    """The params-only export at `path` (`python -m cvqcar.export` of a DQ
    workdir) restored straight onto --mesh=`mesh` in `param_dtype`."""
    config = checkpoint.load_config(path)
    model_cfg = dq.DQConfig(**config.model.to_dict())
    mesh_, spans, load_mesh = car_sampler.sampling_mesh(
        mesh, model_cfg.num_kv_heads)
    graphdef, abstract = nnx.split(nnx.eval_shape(
        lambda: dq.DQTransformer(model_cfg, rngs=nnx.Rngs(0))))
    params = car_sampler.restore_onto_mesh(
        path, {"params": abstract}, mesh_, load_mesh, config,
        param_dtype)["params"]
    logging.info("DQ-Transformer %s on mesh %s (%s) in %s", path,
                 dict(mesh_.shape),
                 "all processes" if spans else "this process", param_dtype)
    return cls(graphdef, params, config, mesh_, spans)

  @classmethod
  def from_model(cls, model: dq.DQTransformer,
                 config: ml_collections.ConfigDict, mesh: str = "",
                 param_dtype: str | None = None) -> DQSampler:
    """A model in memory (`config`: its training config, for the sharding
    rules) put on --mesh=`mesh` of this process's devices."""
    mesh_, spans, _ = car_sampler.sampling_mesh(mesh,
                                                model.config.num_kv_heads)
    if spans:
      raise ValueError(f"--mesh={mesh!r} spans processes: an in-memory model"
                       " samples on this process's devices; load an export"
                       " (DQSampler.load) to sample across processes")
    graphdef, params = nnx.split(model)
    return cls(graphdef, car_sampler.put_on_mesh(params, mesh_, config,
                                                 param_dtype), config, mesh_)

  @property
  def batch_ways(self) -> int:
    """Devices the conditions are split over (data x fsdp)."""
    return math.prod(self.mesh.shape[a] for a in sharding.BATCH_AXES)

  def sample(self, cond, keys_b, **settings) -> tuple[np.ndarray, ...]:
    """(codes [B, T], positions [B, T], lengths [B]) as numpy for a
    condition (class ids [B], or left-padded text ids and mask [B, L]) and
    one key per row [B]; settings are `transformer.generate`'s. Rows are
    padded to the batch ways (null conditions) and split over them; every
    process of a mesh across processes passes the same rows and gets all
    of them back."""
    c = self.model_config
    cond = (tuple(np.asarray(x) for x in cond) if c.text_vocab
            else np.asarray(cond))
    dq.check_condition(c, cond)
    keys = np.asarray(jax.random.key_data(keys_b))
    b = jax.tree.leaves(cond)[0].shape[0]
    if keys.shape[0] != b:
      raise ValueError(f"{keys.shape[0]} keys for {b} rows: pass one key per"
                       " row (cvqcar.car.sampling.sample_keys)")
    pad = -(-b // self.batch_ways) * self.batch_ways - b
    if pad:  # null rows with a copy of the last key: rows never mix
      null = np.asarray(dq.null_condition(c, tuple(x[-1:] for x in cond)
                                          if c.text_vocab else cond[-1:]))
      cond = (tuple(np.concatenate([x, np.repeat(n, pad, axis=0)])
                    for x, n in zip(cond, null, strict=True))
              if c.text_vocab else
              np.concatenate([cond, np.repeat(null, pad, axis=0)]))
      keys = np.concatenate([keys, np.repeat(keys[-1:], pad, axis=0)])
    rows = sharding.batch_sharded(self.mesh)
    ids = lambda x: self._put(np.asarray(x, np.int32), rows)
    cond = tuple(ids(x) for x in cond) if c.text_vocab else ids(cond)
    keys = jax.random.wrap_key_data(self._put(keys, rows))
    model = nnx.merge(self.graphdef, self.params)
    with jax.set_mesh(self.mesh):
      out = dq.generate(model, cond, keys, **settings)
    if self.spans_processes:
      out = multihost_utils.process_allgather(out, tiled=True)
    return tuple(np.asarray(x)[:b] for x in out)

  def _put(self, x: np.ndarray, rows: NamedSharding) -> Any:
    if self.spans_processes:  # every process holds all rows: slice them
      return jax.make_array_from_callback(x.shape, rows, lambda i: x[i])
    return jax.device_put(x, rows)
