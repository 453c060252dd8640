"""Sampling CVQ channel tokens from a CAR model.

Decoding is one jitted function: prefill [prompt][begin-of-image] into a KV
cache, then exactly C steps of one token each (`lax.scan`), with
temperature / top-k / top-p sampling and classifier-free guidance (the
conditional and unconditional rows run as one batch).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from cvqcar import metrics
from cvqcar.car import model as car_lib


def filter_logits(logits_bk, *, top_k: int = 0, top_p: float = 1.0):
  """-inf outside the top-k codes and outside the top-p probability mass."""
  if top_k > 0:
    kth = jax.lax.top_k(logits_bk, top_k)[0][:, -1:]
    logits_bk = jnp.where(logits_bk < kth, -jnp.inf, logits_bk)
  if top_p < 1.0:
    sorted_bk = jnp.sort(logits_bk, axis=-1)[:, ::-1]
    cum = jnp.cumsum(jax.nn.softmax(sorted_bk, axis=-1), axis=-1)
    # Keep codes until the mass before them reaches top_p (at least one).
    keep = (cum - jax.nn.softmax(sorted_bk, axis=-1)) < top_p
    cutoff = jnp.min(jnp.where(keep, sorted_bk, jnp.inf), axis=-1,
                     keepdims=True)
    logits_bk = jnp.where(logits_bk < cutoff, -jnp.inf, logits_bk)
  return logits_bk


def check_settings(*, temperature: float, top_k: int, top_p: float,
                   num_codes: int) -> None:
  """Raises naming the value unless the sampling settings make sense.

  temperature 0 is the explicit greedy mode; top_k 0 and top_p 1 are off.
  """
  if not temperature >= 0.0:  # also catches NaN
    raise ValueError(f"temperature must be > 0 (or 0 for greedy), got"
                     f" {temperature}")
  if not 0 <= top_k <= num_codes:
    raise ValueError(f"top_k must be in 0..{num_codes} (0 = off, K ="
                     f" {num_codes} codes), got {top_k}")
  if not 0.0 < top_p <= 1.0:
    raise ValueError(f"top_p must be in (0, 1] (1 = off), got {top_p}")


def pick(logits_bk, key, *, temperature: float, top_k: int, top_p: float):
  if temperature == 0.0:
    return jnp.argmax(logits_bk, axis=-1).astype(jnp.int32)
  logits_bk = filter_logits(logits_bk / temperature, top_k=top_k, top_p=top_p)
  return jax.random.categorical(key, logits_bk).astype(jnp.int32)


def _with_unconditional(text_bl, mask_bl, cfg_scale):
  if cfg_scale == 1.0:
    return text_bl, mask_bl
  return (jnp.concatenate([text_bl, text_bl]),
          jnp.concatenate([mask_bl, jnp.zeros_like(mask_bl)]))


def _guide(logits, batch, cfg_scale):
  if cfg_scale == 1.0:
    return logits
  return car_lib.guided_logits(logits[:batch], logits[batch:], cfg_scale)


@functools.partial(jax.jit, static_argnames=(
    "graphdef", "temperature", "top_k", "top_p", "cfg_scale", "use_cache"))
def generate(graphdef, states, text_bl, mask_bl, key, *, temperature=1.0,
             top_k=0, top_p=1.0, cfg_scale=1.0, use_cache=True):
  """Channel tokens [B, C] for left-padded prompts [B, L] (mask 0 = pad).

  `graphdef` and `states` (a tuple) are `nnx.split` of a CAR model.

  use_cache=False recomputes the whole sequence at every step (the
  reference for the cached path, and the baseline in bench/decode.py).
  """
  model = nnx.merge(graphdef, *states)
  check_settings(temperature=temperature, top_k=top_k, top_p=top_p,
                 num_codes=model.num_codes)
  b = text_bl.shape[0]
  c = model.num_channels
  text2, mask2 = _with_unconditional(text_bl, mask_bl, cfg_scale)
  sample = functools.partial(pick, temperature=temperature, top_k=top_k,
                             top_p=top_p)

  if not use_cache:
    def body(i, tokens_bc):
      tokens2 = jnp.concatenate([tokens_bc] * (text2.shape[0] // b))
      logits = model(text2, mask2, tokens2)[:, i]
      token = sample(_guide(logits, b, cfg_scale), jax.random.fold_in(key, i))
      return tokens_bc.at[:, i].set(token)

    return jax.lax.fori_loop(0, c, body, jnp.zeros((b, c), jnp.int32))

  prefix, prefix_mask = model.prefix(text2, mask2)
  positions = car_lib.positions_from_mask(prefix_mask)
  cache = model.backbone.init_cache(text2.shape[0], prefix.shape[1] + c)
  hidden, cache = model.backbone.forward_embeddings(
      prefix, positions, cache, attention_mask=prefix_mask)
  logits = model.image_logits(hidden[:, -1])

  def step(carry, i):
    cache, logits, pos = carry
    token = sample(_guide(logits, b, cfg_scale), jax.random.fold_in(key, i))
    token2 = jnp.concatenate([token] * (text2.shape[0] // b))
    x = model.embed_image_tokens(token2[:, None])
    hidden, cache = model.backbone.forward_embeddings(
        x.astype(prefix.dtype), pos[:, None], cache)
    return (cache, model.image_logits(hidden[:, 0]), pos + 1), token

  _, tokens_cb = jax.lax.scan(step, (cache, logits, positions[:, -1] + 1),
                              jnp.arange(c))
  return tokens_cb.T


def coarse_to_fine_strip(tokenizer, tokens_bc) -> np.ndarray:
  """[B, len(ks), H, W, 3] decodes from the first k tokens, k in
  metrics.prefix_lengths(C): C/64 (at least 1) ... C/2, C."""
  tokens_bc = np.asarray(tokens_bc)  # Off the sampling mesh.
  ks = metrics.prefix_lengths(tokens_bc.shape[1])
  return np.stack([np.asarray(tokenizer.decode(tokens_bc[:, :k]))
                   for k in ks], axis=1)
