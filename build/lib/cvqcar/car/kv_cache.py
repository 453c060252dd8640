"""The Qwen3 decoder's KV cache: keys and values of every layer by slot."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from cvqcar import sharding


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class KVCache:
  """Keys and values of every layer for `max_len` slots, filled in order.

  Callers keep index + T <= max_len: under jit the index is traced, and
  dynamic_update_slice clamps a write past the end onto the last slots.
  """

  k: jax.Array  # [L, B, S, K, hd], post-RoPE; scanned with the layers
  v: jax.Array  # [L, B, S, K, hd]
  mask: jax.Array  # [B, S] bool: the slot holds a real (non-padding) token
  index: jax.Array  # [] int32: slots filled so far

  @property
  def max_len(self) -> int:
    return self.k.shape[2]


def init_cache(config: Any, batch: int, max_len: int,
               dtype=None) -> KVCache:
  """An empty cache for a qwen3.Qwen3Config (which imports this module);
  `dtype` defaults to the config's activation dtype."""
  shape = (config.num_hidden_layers, batch, max_len,
           config.num_key_value_heads, config.head_dim)
  dtype = dtype or config.dtype
  return constrain(KVCache(
      k=jnp.zeros(shape, dtype), v=jnp.zeros(shape, dtype),
      mask=jnp.zeros((batch, max_len), bool),
      index=jnp.zeros((), jnp.int32)))


def constrain(cache: KVCache) -> KVCache:
  """On a mesh (jax.set_mesh), rows split over the batch axes and kv heads
  over 'model', as the attention that reads them; a no-op without one."""
  kv = lambda x: sharding.constrain_axes(x, None, "batch", None, "model",
                                         None)
  return KVCache(k=kv(cache.k), v=kv(cache.v),
                 mask=sharding.constrain_axes(cache.mask, "batch", None),
                 index=cache.index)


def decode_windows(filled: int, steps: int, chunks: int = 4
                   ) -> list[tuple[int, int]]:
  """[(n, window)]: `steps` one-token decoding steps after `filled` cache
  slots, in up to `chunks` runs of n steps whose tokens attend to the first
  `window` slots (all that are filled by the run's end). Each run is one
  compiled loop; later runs read more of the cache, none reads all of it
  before it is full."""
  chunks = max(1, min(chunks, steps))
  out, done = [], 0
  for i in range(chunks):
    n = steps // chunks + (i < steps % chunks)
    done += n
    out.append((n, filled + done))
  return [(n, w) for n, w in out if n]
