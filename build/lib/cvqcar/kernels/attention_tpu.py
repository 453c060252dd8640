"""Causal self-attention with key padding through Pallas splash attention.

The TPU training path of the Qwen3 backbone: flash-style blocked attention
that never writes the [B, H, T, S] score tensor. Grouped kv heads run as
multi-query kernels (one per kv head, its G query heads together); left
padding is expressed as segment ids (padding tokens only see padding), and T
is padded up to the block size. `interpret=True` runs the same kernel on any
backend (the tests' reference check on CPU).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.experimental.pallas.ops.tpu.splash_attention import (
    splash_attention_kernel as splash,
)
from jax.experimental.pallas.ops.tpu.splash_attention import (
    splash_attention_mask as masks,
)

BLOCK = 512  # tokens per q / kv tile on TPU (a multiple of 128)


def _kernel(length: int, groups: int, block: int, interpret: bool):
  # Built per trace: the kernel holds jnp mask tables, which a cache shared
  # across traces would leak as tracers.
  mask = masks.MultiHeadMask([masks.CausalMask((length, length))] * groups)
  sizes = splash.BlockSizes(
      block_q=block, block_kv=block, block_kv_compute=block,
      block_q_dkv=block, block_kv_dkv=block, block_kv_dkv_compute=block,
      block_q_dq=block, block_kv_dq=block)
  return splash.make_splash_mqa(mask, block_sizes=sizes, head_shards=1,
                                q_seq_shards=1, interpret=interpret)


def causal_attention(q, k, v, key_valid, *, block: int = BLOCK,
                     interpret: bool = False):
  """softmax(q k^T / sqrt(hd) + causal + padding) v.

  q [B, T, H, hd]; k, v [B, T, K, hd] with K dividing H (query head h reads
  kv head h // (H / K)); key_valid [B, T] bool (false: padding). Returns
  [B, T, H, hd] in q's dtype.
  """
  b, t, h, d = q.shape
  kv_heads = k.shape[2]
  groups = h // kv_heads
  block = min(block, -(-t // 128) * 128)
  length = -(-t // block) * block

  def pad(x):
    return jnp.pad(x, [(0, 0), (0, length - t)] + [(0, 0)] * (x.ndim - 2))

  # [B, K, G, T, hd] queries, pre-scaled (the kernel does not scale).
  qs = pad(q * jnp.asarray(d ** -0.5, q.dtype)).reshape(
      b, length, kv_heads, groups, d).transpose(0, 2, 3, 1, 4)
  ks = pad(k).transpose(0, 2, 1, 3)  # [B, K, T, hd]
  vs = pad(v).transpose(0, 2, 1, 3)
  # Padding (and the tail added above) only sees padding: no empty rows.
  segments = pad(key_valid.astype(jnp.int32))
  kernel = _kernel(length, groups, block, interpret)

  def one(q, k, v, seg):
    return kernel(q, k, v, segment_ids=splash.SegmentIds(seg, seg))

  out = jax.vmap(jax.vmap(one, (0, 0, 0, None)))(qs, ks, vs, segments)
  return out.transpose(0, 3, 1, 2, 4).reshape(b, length, h, d)[:, :t]
