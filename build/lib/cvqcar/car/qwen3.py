"""Qwen3 decoder-only language model: scanned layers, remat, KV cache.

The decoder layers' weights are stacked on a leading 'layers' axis and run
under lax.scan, so compile time does not grow with depth; `config.remat`
picks what the backward pass recomputes. Hugging Face checkpoints load and
save through cvqcar.car.hf_io.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import PartitionSpec as P

from cvqcar import sharding
from cvqcar.car.kv_cache import KVCache, constrain, decode_windows, init_cache
from cvqcar.kernels import attention_tpu

__all__ = ["KVCache", "decode_windows", "init_cache"]  # kv_cache's, here too

_DTYPES = ("float32", "bfloat16", "float16")
_REMAT_NAMES = ("none", "full", "save-dots")
_ATTENTION = ("auto", "xla", "cudnn", "splash", "plain")
# HF's Qwen3Config default when a config.json names no rope_theta.
_HF_DEFAULT_ROPE_THETA = 10000.0


@dataclasses.dataclass(frozen=True)
class Qwen3Config:
  """Architecture of a Qwen3 dense model; field names follow config.json."""

  vocab_size: int
  hidden_size: int
  intermediate_size: int
  num_hidden_layers: int
  num_attention_heads: int
  num_key_value_heads: int
  head_dim: int
  rms_norm_eps: float = 1e-6
  rope_theta: float = 1e6
  max_position_embeddings: int = 40960
  tie_word_embeddings: bool = False
  dtype: str = "float32"  # activations and matmuls
  param_dtype: str = "float32"  # stored (master) weights
  # How the trunk runs; not part of the architecture or of config.json.
  scan_layers: bool = True  # lax.scan over the stacked layers, else a loop
  remat: str = "none"  # REMAT_POLICIES: none, full, save-dots
  attention: str = "auto"  # auto, xla, cudnn, splash, plain: attention()

  def __post_init__(self):
    for name in ("vocab_size", "hidden_size", "intermediate_size",
                 "num_hidden_layers", "num_attention_heads",
                 "num_key_value_heads", "head_dim",
                 "max_position_embeddings"):
      value = getattr(self, name)
      if not isinstance(value, int) or value <= 0:
        raise ValueError(f"Qwen3Config.{name}={value!r}; expected a positive"
                         " int")
    if self.num_attention_heads % self.num_key_value_heads:
      raise ValueError(
          f"num_attention_heads={self.num_attention_heads} is not a multiple"
          f" of num_key_value_heads={self.num_key_value_heads}")
    if self.head_dim % 2:
      raise ValueError(f"head_dim={self.head_dim}; RoPE needs an even head_dim")
    for name in ("dtype", "param_dtype"):
      # Accept jnp.bfloat16 and friends; store the name so configs hash and
      # serialise.
      value = jnp.dtype(getattr(self, name)).name
      if value not in _DTYPES:
        raise ValueError(f"Qwen3Config.{name}={getattr(self, name)!r};"
                         f" expected one of {_DTYPES}")
      object.__setattr__(self, name, value)
    if self.remat not in _REMAT_NAMES:
      raise ValueError(f"Qwen3Config.remat={self.remat!r}; expected one of"
                       f" {_REMAT_NAMES}")
    if self.attention not in _ATTENTION:
      raise ValueError(f"Qwen3Config.attention={self.attention!r}; expected"
                       f" one of {_ATTENTION}")

  @classmethod
  def from_hf_dict(cls, d: Mapping[str, Any], **overrides) -> Qwen3Config:
    """Reads a Hugging Face Qwen3 config.json dict; `overrides` win."""
    model_type = d.get("model_type", "qwen3")
    if model_type != "qwen3":
      raise ValueError(f"config.json model_type={model_type!r}; expected"
                       " 'qwen3'")
    for key, want in (("attention_bias", False), ("hidden_act", "silu"),
                      ("use_sliding_window", False)):
      if d.get(key, want) != want:
        raise ValueError(f"config.json {key}={d[key]!r}; this Qwen3 supports"
                         f" only {want!r}")
    required = ("vocab_size", "hidden_size", "intermediate_size",
                "num_hidden_layers", "num_attention_heads")
    missing = [k for k in required if k not in d]
    if missing:
      raise ValueError(f"config.json lacks {missing}")
    heads = d["num_attention_heads"]
    # Both dtype keys appear in the wild: torch_dtype before transformers 4.56.
    dtype = d.get("dtype") or d.get("torch_dtype") or "float32"
    kwargs = dict(
        vocab_size=d["vocab_size"],
        hidden_size=d["hidden_size"],
        intermediate_size=d["intermediate_size"],
        num_hidden_layers=d["num_hidden_layers"],
        num_attention_heads=heads,
        num_key_value_heads=d.get("num_key_value_heads") or heads,
        head_dim=d.get("head_dim") or d["hidden_size"] // heads,
        rms_norm_eps=float(d.get("rms_norm_eps", 1e-6)),
        rope_theta=_rope_theta(d),
        max_position_embeddings=d.get("max_position_embeddings", 32768),
        tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
        dtype=dtype, param_dtype=dtype)
    kwargs.update(overrides)
    return cls(**kwargs)

  def to_hf_dict(self) -> dict[str, Any]:
    """A config.json for transformers' Qwen3ForCausalLM (4.51 to 5.x)."""
    rope = {"rope_type": "default", "rope_theta": self.rope_theta}
    return {
        "architectures": ["Qwen3ForCausalLM"],
        "model_type": "qwen3",
        "vocab_size": self.vocab_size,
        "hidden_size": self.hidden_size,
        "intermediate_size": self.intermediate_size,
        "num_hidden_layers": self.num_hidden_layers,
        "num_attention_heads": self.num_attention_heads,
        "num_key_value_heads": self.num_key_value_heads,
        "head_dim": self.head_dim,
        "hidden_act": "silu",
        "attention_bias": False,
        "attention_dropout": 0.0,
        "rms_norm_eps": self.rms_norm_eps,
        "max_position_embeddings": self.max_position_embeddings,
        "tie_word_embeddings": self.tie_word_embeddings,
        "use_sliding_window": False,
        # Older transformers read the top-level key, 5.x rope_parameters.
        "rope_theta": self.rope_theta,
        "rope_parameters": rope,
        "dtype": self.param_dtype,
        "torch_dtype": self.param_dtype,
    }


def _rope_theta(d: Mapping[str, Any]) -> float:
  """rope_theta from either config.json form; plain RoPE only."""
  params = d.get("rope_parameters") or d.get("rope_scaling") or {}
  if not isinstance(params, Mapping):
    raise ValueError(f"config.json rope_parameters={params!r}; expected a"
                     " dict like {'rope_type': 'default', 'rope_theta': 1e6}")
  rope_type = params.get("rope_type", params.get("type", "default"))
  if rope_type != "default":
    raise ValueError(f"config.json rope_type={rope_type!r} is not supported;"
                     " expected 'default' (unscaled RoPE)")
  theta = params.get("rope_theta", d.get("rope_theta", _HF_DEFAULT_ROPE_THETA))
  return float(theta)


PRESETS = {
    "tiny": Qwen3Config(
        vocab_size=512, hidden_size=64, intermediate_size=128,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        head_dim=16, max_position_embeddings=2048, tie_word_embeddings=True),
    # The rest are the published Qwen/Qwen3-* config.json values, computing
    # in bfloat16 on float32 master weights.
    "0.6b": Qwen3Config(
        vocab_size=151936, hidden_size=1024, intermediate_size=3072,
        num_hidden_layers=28, num_attention_heads=16, num_key_value_heads=8,
        head_dim=128, tie_word_embeddings=True,
        dtype="bfloat16"),
    "1.7b": Qwen3Config(
        vocab_size=151936, hidden_size=2048, intermediate_size=6144,
        num_hidden_layers=28, num_attention_heads=16, num_key_value_heads=8,
        head_dim=128, tie_word_embeddings=True,
        dtype="bfloat16"),
    "4b": Qwen3Config(
        vocab_size=151936, hidden_size=2560, intermediate_size=9728,
        num_hidden_layers=36, num_attention_heads=32, num_key_value_heads=8,
        head_dim=128, tie_word_embeddings=True,
        dtype="bfloat16"),
    "8b": Qwen3Config(
        vocab_size=151936, hidden_size=4096, intermediate_size=12288,
        num_hidden_layers=36, num_attention_heads=32, num_key_value_heads=8,
        head_dim=128, tie_word_embeddings=False,
        dtype="bfloat16"),
}


def rope(x, positions, theta: float):
  """Rotates [B, T, N, hd] by positions [B, T], rotate-half layout as HF."""
  hd = x.shape[-1]
  inv_freq = 1.0 / theta ** (jnp.arange(0, hd, 2, dtype=jnp.float32) / hd)
  angles = positions[..., None].astype(jnp.float32) * inv_freq  # [B, T, hd/2]
  angles = jnp.concatenate([angles, angles], -1)[:, :, None]  # [B, T, 1, hd]
  x32 = x.astype(jnp.float32)
  x1, x2 = jnp.split(x32, 2, axis=-1)
  rotated = jnp.concatenate([-x2, x1], -1)
  return (x32 * jnp.cos(angles) + rotated * jnp.sin(angles)).astype(x.dtype)


def _linear(cin, cout, names, config, rngs):
  return nnx.Linear(
      cin, cout, use_bias=False, dtype=config.dtype,
      param_dtype=config.param_dtype, rngs=rngs,
      kernel_init=sharding.axes(nnx.initializers.normal(0.02), *names))


class RMSNorm(nnx.Module):
  """x / rms(x) * weight over the last axis, normalised in float32 as HF."""

  def __init__(self, dim: int, config: Qwen3Config, *, rngs: nnx.Rngs):
    init = sharding.axes(nnx.initializers.ones_init(), "norm")
    self.weight = nnx.Param(init(rngs.params(), (dim,), config.param_dtype))
    self.eps = config.rms_norm_eps
    self.dtype = config.dtype

  def __call__(self, x):
    x32 = x.astype(jnp.float32)
    x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, -1, keepdims=True) +
                              self.eps)
    return self.weight.astype(self.dtype) * x32.astype(self.dtype)


def attention(q, k, v, mask, causal: bool, implementation: str):
  """softmax(q k^T / sqrt(hd)) v with grouped kv heads.

  q [B, T, H, hd], k and v [B, S, K, hd], mask [B, 1, T or 1, S] (true:
  may attend); `causal` adds the lower-triangular mask (T == S). 'plain' is
  the reference einsum path with float32 scores; 'splash' the Pallas TPU
  kernel (causal with key padding only: mask [B, 1, 1, S]); anything else
  goes through jax.nn.dot_product_attention ('xla', 'cudnn', or 'auto': its
  own choice, cuDNN flash attention on a GPU when shapes and dtypes allow).
  """
  if implementation == "splash":
    return _splash_attention(q, k, v, mask[:, 0, 0])
  if implementation != "plain":
    return jax.nn.dot_product_attention(
        q, k, v, mask=mask, is_causal=causal,
        implementation=None if implementation == "auto" else implementation)
  b, t, h, hd = q.shape
  groups = h // k.shape[2]
  if causal:
    mask = mask & jnp.tril(jnp.ones((t, k.shape[1]), bool))
  # Query head h reads kv head h // groups, as HF's repeat_kv.
  q = q.reshape(b, t, -1, groups, hd)  # [B, T, K, G, hd]
  scores = jnp.einsum("btkgd,bskd->bkgts", q, k,
                      preferred_element_type=jnp.float32) * hd ** -0.5
  # A finite floor keeps rows with no visible key (padding) free of NaN.
  scores = jnp.where(mask[:, :, None], scores, jnp.finfo(jnp.float32).min)
  probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
  return jnp.einsum("bkgts,bskd->btkgd", probs, v).reshape(b, t, h, hd)


def _cached_attention_cpu(q, k, v, mask):
  """attention() over a cache, as two dots batched over B alone.

  XLA:CPU lays a dot batched over (B, kv heads) out with those axes major,
  so it copies and transposes the whole [B, S, K, hd] cache of a layer at
  every decoding step. Here the queries are spread block-diagonally over
  the K * hd columns (zero where a query head does not read that kv head)
  and the cache is read as [B, S, K * hd], as stored: K times the (tiny)
  flops of a decoding step for a fraction of its memory traffic.
  """
  b, t, h, hd = q.shape
  kv_heads = k.shape[2]
  groups = h // kv_heads
  eye_kk = jnp.eye(kv_heads, dtype=q.dtype)
  q = q.reshape(b, t, kv_heads, groups, 1, hd) * eye_kk[:, None, :, None]
  q = q.reshape(b, t * h, kv_heads * hd)  # [B, T*H, K*hd]
  scores = jnp.einsum("bmc,bsc->bms", q, k.reshape(b, -1, kv_heads * hd),
                      preferred_element_type=jnp.float32) * hd ** -0.5
  scores = scores.reshape(b, t, h, -1)  # [B, T, H, S]
  # A finite floor keeps rows with no visible key (padding) free of NaN.
  scores = jnp.where(mask[:, 0, :, None], scores, jnp.finfo(jnp.float32).min)
  probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
  out = jnp.einsum("bms,bsc->bmc", probs.reshape(b, t * h, -1),
                   v.reshape(b, -1, kv_heads * hd))
  # Each query head keeps the columns of its own kv head.
  out = out.reshape(b, t, kv_heads, groups, kv_heads, hd)
  return jnp.einsum("btkgjd,kj->btkgd", out, eye_kk).reshape(b, t, h, hd)


def _splash_attention(q, k, v, key_valid):
  """The splash kernel per device: batch over the data-parallel axes and
  heads over 'model' of the mesh in context (pallas_call is not
  partitioned automatically). Interpreted off TPU, for the tests."""
  fn = functools.partial(attention_tpu.causal_attention,
                         interpret=jax.default_backend() != "tpu")
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return fn(q, k, v, key_valid)
  size = lambda axes: math.prod(mesh.shape[a] for a in axes)
  batch = tuple(a for a in sharding.BATCH_AXES
                if a in mesh.axis_names and mesh.shape[a] > 1)
  if q.shape[0] % size(batch):
    batch = ()
  heads = tuple(a for a in ("model",) if a in mesh.axis_names and
                mesh.shape[a] > 1 and k.shape[2] % mesh.shape[a] == 0)
  spec = P(batch or None, None, heads or None)
  return jax.shard_map(fn, mesh=mesh, in_specs=(spec, spec, spec,
                                                P(batch or None)),
                       out_specs=spec, check_vma=False)(q, k, v, key_valid)


class Attention(nnx.Module):
  """Grouped-query attention with per-head q/k RMSNorm before RoPE."""

  def __init__(self, config: Qwen3Config, *, rngs: nnx.Rngs):
    c, hd = config, config.head_dim
    self.q_proj = _linear(c.hidden_size, c.num_attention_heads * hd,
                          ("embed", "heads"), c, rngs)
    self.k_proj = _linear(c.hidden_size, c.num_key_value_heads * hd,
                          ("embed", "kv_heads"), c, rngs)
    self.v_proj = _linear(c.hidden_size, c.num_key_value_heads * hd,
                          ("embed", "kv_heads"), c, rngs)
    self.o_proj = _linear(c.num_attention_heads * hd, c.hidden_size,
                          ("heads", "embed"), c, rngs)
    self.q_norm = RMSNorm(hd, c, rngs=rngs)
    self.k_norm = RMSNorm(hd, c, rngs=rngs)
    self.config = c

  def __call__(self, x, positions, mask, kv=None, index=0, layer=0):
    """x [B, T, D], mask [B, 1, T or 1, S] -> ([B, T, D], kv).

    Without kv the T tokens attend causally among themselves (mask: key
    padding). kv, when given, is every layer's cache (k, v) [L, B, S, K,
    hd]: this layer's (row `layer`) new keys and values are written at slot
    `index`, and `mask` holds causality and padding over all S slots.
    """
    c = self.config
    b, t, _ = x.shape
    q = self.q_norm(self.q_proj(x).reshape(b, t, -1, c.head_dim))
    k = self.k_norm(self.k_proj(x).reshape(b, t, -1, c.head_dim))
    v = self.v_proj(x).reshape(b, t, -1, c.head_dim)
    q = rope(q, positions, c.rope_theta)  # [B, T, H, hd]
    k = rope(k, positions, c.rope_theta)  # [B, T, K, hd]
    impl = c.attention
    if kv is not None:
      # Only the new slots are written, in place: the whole cache rides in
      # the layer scan's carry rather than in and out as a scanned row.
      k_all, v_all = kv
      k_all = jax.lax.dynamic_update_slice(
          k_all, k.astype(k_all.dtype)[None], (layer, 0, index, 0, 0))
      v_all = jax.lax.dynamic_update_slice(
          v_all, v.astype(v_all.dtype)[None], (layer, 0, index, 0, 0))
      kv = (k_all, v_all)
      k = jax.lax.dynamic_index_in_dim(k_all, layer, keepdims=False)
      v = jax.lax.dynamic_index_in_dim(v_all, layer, keepdims=False)
      k, v = k.astype(q.dtype), v.astype(q.dtype)
      window = mask.shape[-1]  # the first slots, all a decoding chunk reads
      if window < k.shape[1]:
        k, v = k[:, :window], v[:, :window]
      # Decoding steps are tiny; the fused kernels want T == S.
      impl = "plain" if impl == "plain" else "xla"
    elif impl == "auto" and jax.default_backend() == "tpu":
      impl = "splash"
    if kv is not None and impl == "xla" and jax.default_backend() == "cpu":
      out = _cached_attention_cpu(q, k, v, mask)
    else:
      out = attention(q, k, v, mask, kv is None, impl)
    return self.o_proj(out.reshape(b, t, -1)), kv


class MLP(nnx.Module):
  """SwiGLU: down(silu(gate(x)) * up(x))."""

  def __init__(self, config: Qwen3Config, *, rngs: nnx.Rngs):
    d, f = config.hidden_size, config.intermediate_size
    self.gate_proj = _linear(d, f, ("embed", "mlp"), config, rngs)
    self.up_proj = _linear(d, f, ("embed", "mlp"), config, rngs)
    self.down_proj = _linear(f, d, ("mlp", "embed"), config, rngs)

  def __call__(self, x):
    return self.down_proj(nnx.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nnx.Module):
  """Pre-norm attention and MLP blocks, each with a residual."""

  def __init__(self, config: Qwen3Config, *, rngs: nnx.Rngs):
    self.input_layernorm = RMSNorm(config.hidden_size, config, rngs=rngs)
    self.self_attn = Attention(config, rngs=rngs)
    self.post_attention_layernorm = RMSNorm(config.hidden_size, config,
                                            rngs=rngs)
    self.mlp = MLP(config, rngs=rngs)

  def __call__(self, x, positions, mask, kv=None, index=0, layer=0):
    h, kv = self.self_attn(self.input_layernorm(x), positions, mask, kv,
                           index, layer)
    x = x + h
    return x + self.mlp(self.post_attention_layernorm(x)), kv


REMAT_POLICIES = {
    "none": None,  # keep every activation
    "full": jax.checkpoint_policies.nothing_saveable,  # recompute the layer
    # keep matmul outputs, recompute the cheap elementwise work
    "save-dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def stacked_layers(config: Qwen3Config, rngs: nnx.Rngs) -> DecoderLayer:
  """All decoder layers as one DecoderLayer whose weights carry a leading
  [num_hidden_layers] axis (logical axis 'layers'), for lax.scan."""
  keys = jax.random.split(rngs.params(), config.num_hidden_layers)
  template = nnx.eval_shape(lambda: DecoderLayer(config, rngs=nnx.Rngs(0)))
  graphdef = nnx.graphdef(template)
  states = jax.vmap(lambda key: nnx.state(
      DecoderLayer(config, rngs=nnx.Rngs(params=key))))(keys)
  layers = nnx.merge(graphdef, states)
  for _, variable in nnx.iter_graph(layers):
    if isinstance(variable, nnx.Variable):
      names = variable.get_metadata().get("logical_axes")
      if names is not None:
        variable.set_metadata(logical_axes=("layers", *names))
  return layers


class Qwen3(nnx.Module):
  """Token ids [B, T] -> logits [B, T, vocab]; see forward_embeddings."""

  def __init__(self, config: Qwen3Config, *, rngs: nnx.Rngs):
    self.config = config
    self.embed_tokens = nnx.Embed(
        config.vocab_size, config.hidden_size, dtype=config.dtype,
        param_dtype=config.param_dtype, rngs=rngs,
        embedding_init=sharding.axes(nnx.initializers.normal(0.02), "vocab",
                                     "embed"))
    self.layers = stacked_layers(config, rngs)
    self.norm = RMSNorm(config.hidden_size, config, rngs=rngs)
    self.lm_head = None if config.tie_word_embeddings else _linear(
        config.hidden_size, config.vocab_size, ("embed", "vocab"), config,
        rngs)

  def layer(self, i: int) -> DecoderLayer:
    """Decoder layer i, a view of row i of the stacked weights."""
    graphdef, state = nnx.split(self.layers)
    return nnx.merge(graphdef, jax.tree.map(lambda x: x[i], state))

  def init_cache(self, batch: int, max_len: int, dtype=None) -> KVCache:
    return init_cache(self.config, batch, max_len, dtype)

  def embed(self, token_ids):
    """[B, T] int -> [B, T, D]."""
    return self.embed_tokens(token_ids)

  def logits(self, hidden):
    """Final-normed hidden [B, T, D] -> [B, T, vocab]."""
    if self.lm_head is None:
      return self.embed_tokens.attend(hidden)
    return self.lm_head(hidden)

  def forward_embeddings(self, x, positions=None, cache=None,
                         attention_mask=None, window: int | None = None):
    """Runs the trunk on embeddings x [B, T, D].

    Returns (hidden [B, T, D] after the final norm, the updated cache or
    None). Without a cache the T tokens attend causally to each other; with
    one they take slots index..index+T-1 and attend causally to every filled
    slot. positions [B, T] default to the slot numbers. attention_mask
    [B, T] (true for real tokens) marks padding among the new tokens; the
    cache remembers it, so later tokens never attend to those slots either.
    `window` (static; with a cache) reads only the cache's first `window`
    slots, which must hold every filled one (index + T <= window): decoding
    in chunks (`decode_windows`) then reads what is filled, not max_len.
    """
    b, t, d = x.shape
    if d != self.config.hidden_size:
      raise ValueError(f"embeddings {x.shape}; expected [B, T,"
                       f" {self.config.hidden_size}]")
    if attention_mask is None:
      attention_mask = jnp.ones((b, t), bool)
    if attention_mask.shape != (b, t):
      raise ValueError(f"attention_mask {attention_mask.shape}; expected"
                       f" {(b, t)} for embeddings {x.shape}")
    index = 0 if cache is None else cache.index
    q_slots = index + jnp.arange(t)  # [T]
    if positions is None:
      positions = jnp.broadcast_to(q_slots, (b, t))
    if positions.shape != (b, t):
      raise ValueError(f"positions {positions.shape}; expected {(b, t)} for"
                       f" embeddings {x.shape}")
    if cache is None:
      mask = attention_mask.astype(bool)[:, None, None]  # [B, 1, 1, S=T]
      kv = None
    else:
      if cache.k.shape[1] != b or t > cache.max_len:
        raise ValueError(f"{t} new tokens for batch {b} do not fit a cache of"
                         f" batch {cache.k.shape[1]}, max_len"
                         f" {cache.max_len}")
      key_valid = jax.lax.dynamic_update_slice(
          cache.mask, attention_mask.astype(bool), (0, index))
      slots = cache.max_len if window is None else window
      if not 0 < slots <= cache.max_len:
        raise ValueError(f"window {window} outside 1..{cache.max_len}, the"
                         " cache's slots")
      k_slots = jnp.arange(slots)  # [S]
      # Causal over slots, not positions: callers may pass any positions.
      causal = k_slots[None, :] <= q_slots[:, None]  # [T, S]
      mask = (causal[None] & key_valid[:, None, :slots])[:, None]
      kv = (cache.k, cache.v)
    h, kv = self._trunk(x.astype(self.config.dtype), positions, mask, kv,
                        index)
    if cache is not None:
      cache = constrain(
          KVCache(k=kv[0], v=kv[1], mask=key_valid, index=index + t))
    return self.norm(h), cache

  def _trunk(self, h, positions, mask, kv, index):
    """The decoder layers, scanned (or looped) over the stacked weights.
    kv, the whole cache, rides in the carry: each layer updates its row in
    place (as scanned-over input and output, every step copied it)."""
    graphdef, stacked = nnx.split(self.layers)

    def body(carry, xs):
      h, kv = carry
      state, layer = xs
      h = sharding.constrain_batch(h)
      h, kv = nnx.merge(graphdef, state)(h, positions, mask, kv, index,
                                         layer)
      return (sharding.constrain_batch(h), kv), None

    policy = self.config.remat
    if policy != "none":
      body = jax.checkpoint(body, policy=REMAT_POLICIES[policy],
                            prevent_cse=not self.config.scan_layers)
    layers = jnp.arange(self.config.num_hidden_layers)
    if self.config.scan_layers:
      return jax.lax.scan(body, (h, kv), (stacked, layers))[0]
    for i in range(self.config.num_hidden_layers):
      (h, kv), _ = body((h, kv), (jax.tree.map(lambda x: x[i], stacked), i))
    return h, kv

  def __call__(self, token_ids, positions=None, cache=None,
               attention_mask=None, window: int | None = None):
    """Logits [B, T, vocab], or (logits, cache) when a cache is given
    (`window`: see forward_embeddings)."""
    hidden, new_cache = self.forward_embeddings(
        self.embed(token_ids), positions, cache, attention_mask, window)
    logits = self.logits(hidden)
    return logits if cache is None else (logits, new_cache)


def param_count(config: Qwen3Config) -> int:
  """Parameters of a model built from `config`, without allocating them."""
  model = nnx.eval_shape(lambda: Qwen3(config, rngs=nnx.Rngs(0)))
  return sum(math.prod(x.shape)
             for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
