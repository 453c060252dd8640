"""Sampling CVQ channel tokens from a CAR model.

Decoding is one jitted function: prefill [prompt][begin-of-image] into a KV
cache, then exactly C steps of one token each (`lax.scan`), with
temperature / top-k / top-p sampling and classifier-free guidance (the
conditional and unconditional rows run as one batch).

Per-sample randomness: with one PRNG key per row (`sample_keys`), a row's
tokens depend on its prompt and its key alone, not on the rows beside it,
so a sample can be regenerated with any batch size or process count. (Up
to the backend's arithmetic: a GPU may pick another matmul kernel for
another batch size, and a last-bit change in the logits can flip a draw
that sits on a tie; the tests check bit equality on CPU.)
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from cvqcar import metrics
from cvqcar.car import model as car_lib
from cvqcar.car import qwen3


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


CFG_SCHEDULES = ("constant", "linear", "cosine")


def guidance_scales(cfg_scale: float, num_channels: int,
                    schedule: str = "constant") -> np.ndarray:
  """The guidance scale s_t of each channel step t = 0 .. C-1, float32 [C].

  With u = t / (C - 1) (u = 0 when C = 1) and s = cfg_scale:
    constant  s_t = s
    linear    s_t = 1 + (s - 1) (1 - u)
    cosine    s_t = 1 + (s - 1) (1 + cos(pi u)) / 2
  Linear and cosine guide the first (global) channel with the full s and
  ramp down to 1 (the conditional logits alone) at the last, detail,
  channel; cosine (a half cosine) stays near s over the first channels and
  near 1 over the last.
  """
  if schedule not in CFG_SCHEDULES:
    raise ValueError(f"cfg_schedule must be one of {CFG_SCHEDULES}, got"
                     f" {schedule!r}")
  u = np.arange(num_channels, dtype=np.float64) / max(num_channels - 1, 1)
  if schedule == "constant":
    ramp = np.ones_like(u)
  elif schedule == "linear":
    ramp = 1.0 - u
  else:
    ramp = (1.0 + np.cos(np.pi * u)) / 2.0
  return (1.0 + (cfg_scale - 1.0) * ramp).astype(np.float32)


def sample_keys(seed: int, prompt_ids, sample_ids) -> jax.Array:
  """One PRNG key per row [B]: fold_in(fold_in(key(seed), prompt_id),
  sample_id), so a sample is named by (seed, prompt index, sample index)
  whatever batch or process draws it."""
  prompt_ids = np.asarray(prompt_ids, np.int64).reshape(-1)
  sample_ids = np.asarray(sample_ids, np.int64).reshape(-1)
  if prompt_ids.shape != sample_ids.shape:
    raise ValueError(f"prompt_ids {prompt_ids.shape} and sample_ids"
                     f" {sample_ids.shape} must have one entry per row")
  for name, ids in (("prompt_ids", prompt_ids), ("sample_ids", sample_ids)):
    if ids.size and not 0 <= ids.min() <= ids.max() < 2**32:
      raise ValueError(f"{name} must be in 0..2**32-1, got {ids.min()}.."
                       f"{ids.max()}")
  root = jax.random.key(seed)
  return jax.vmap(lambda p, s: jax.random.fold_in(
      jax.random.fold_in(root, p), s))(
          jnp.asarray(prompt_ids, jnp.uint32),
          jnp.asarray(sample_ids, jnp.uint32))


def pick(logits_bk, key, *, temperature: float, top_k: int, top_p: float):
  if temperature == 0.0:
    return jnp.argmax(logits_bk, axis=-1).astype(jnp.int32)
  logits_bk = filter_logits(logits_bk / temperature, top_k=top_k, top_p=top_p)
  return jax.random.categorical(key, logits_bk).astype(jnp.int32)


def _pick_step(logits_bk, key, step, **settings):
  """Channel `step`'s tokens [B]. `key` is one key for the batch (one draw
  over [B, K]) or one key per row [B]: each row then folds its own key with
  the step, so rows never share randomness."""
  if key.ndim == 0:
    return pick(logits_bk, jax.random.fold_in(key, step), **settings)
  return jax.vmap(lambda k, logits_k: pick(
      logits_k[None], jax.random.fold_in(k, step), **settings)[0])(
          key, logits_bk)


def _with_unconditional(text_bl, mask_bl, cfg_scale):
  if cfg_scale == 1.0:
    return text_bl, mask_bl
  return (jnp.concatenate([text_bl, text_bl]),
          jnp.concatenate([mask_bl, jnp.zeros_like(mask_bl)]))


def _guide(logits, batch, cfg_scale, scale):
  """Guided logits of the `batch` conditional rows; `scale` is this step's
  s_t (the Python float cfg_scale itself under the constant schedule)."""
  if cfg_scale == 1.0:
    return logits
  return car_lib.guided_logits(logits[:batch], logits[batch:], scale)


def row_keys(key, batch: int):
  """A typed key: () for the whole batch or [B] per row (raw uint32 keys
  are wrapped)."""
  if not jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
    key = jax.random.wrap_key_data(key)
  if key.shape not in ((), (batch,)):
    raise ValueError(f"key must be one PRNG key or one per row ({batch},),"
                     f" got shape {key.shape}")
  return key


@functools.partial(jax.jit, static_argnames=(
    "graphdef", "temperature", "top_k", "top_p", "cfg_scale", "cfg_schedule",
    "use_cache", "decode_chunks"))
def generate(graphdef, states, text_bl, mask_bl, key, *, temperature=1.0,
             top_k=0, top_p=1.0, cfg_scale=1.0, cfg_schedule="constant",
             use_cache=True, decode_chunks=4):
  """Channel tokens [B, C] for left-padded prompts [B, L] (mask 0 = pad).

  `graphdef` and `states` (a tuple) are `nnx.split` of a CAR model.

  `key`: one PRNG key per row [B] (`sample_keys`): row b's channel t is
  drawn with fold_in(key[b], t), so its tokens do not depend on the other
  rows. A single key () draws the whole batch at once (the batch's rows
  then share it). Guidance samples once per conditional row from the
  guided logits, and the unconditional copy of the row is fed that token:
  both halves use the row's key. `cfg_schedule` ramps the guidance scale
  over the C steps (`guidance_scales`); 'constant' is cfg_scale at every
  step.

  use_cache=False recomputes the whole sequence at every step (the
  reference for the cached path, and the baseline in bench/decode.py).
  With the cache, the C steps run in `decode_chunks` loops, each reading
  only the cache slots filled by its end (`qwen3.decode_windows`): on
  average about 5/8 of the cache with 4, for as many compiled loops.
  """
  model = nnx.merge(graphdef, *states)
  check_settings(temperature=temperature, top_k=top_k, top_p=top_p,
                 num_codes=model.num_codes)
  b = text_bl.shape[0]
  c = model.num_channels
  key = row_keys(key, b)
  scales_c = guidance_scales(cfg_scale, c, cfg_schedule)
  # Constant guidance keeps the Python float: the same program as before
  # schedules existed, so its tokens are bit for bit the same.
  scale_at = ((lambda i: cfg_scale) if cfg_schedule == "constant"
              else lambda i: jnp.asarray(scales_c)[i])
  text2, mask2 = _with_unconditional(text_bl, mask_bl, cfg_scale)
  sample = functools.partial(_pick_step, key=key, temperature=temperature,
                             top_k=top_k, top_p=top_p)

  if not use_cache:
    def body(i, tokens_bc):
      tokens2 = jnp.concatenate([tokens_bc] * (text2.shape[0] // b))
      logits = model(text2, mask2, tokens2)[:, i]
      token = sample(_guide(logits, b, cfg_scale, scale_at(i)), step=i)
      return tokens_bc.at[:, i].set(token)

    return jax.lax.fori_loop(0, c, body, jnp.zeros((b, c), jnp.int32))

  prefix, prefix_mask = model.prefix(text2, mask2)
  positions = car_lib.positions_from_mask(prefix_mask)
  cache = model.backbone.init_cache(text2.shape[0], prefix.shape[1] + c)
  hidden, cache = model.backbone.forward_embeddings(
      prefix, positions, cache, attention_mask=prefix_mask)
  logits = model.image_logits(hidden[:, -1])

  def step(carry, i, window):
    cache, logits, pos = carry
    token = sample(_guide(logits, b, cfg_scale, scale_at(i)), step=i)
    token2 = jnp.concatenate([token] * (text2.shape[0] // b))
    x = model.embed_image_tokens(token2[:, None])
    hidden, cache = model.backbone.forward_embeddings(
        x.astype(prefix.dtype), pos[:, None], cache, window=window)
    return (cache, model.image_logits(hidden[:, 0]), pos + 1), token

  # In chunks, each attending to the slots filled by its end (not all C).
  carry, tokens, start = (cache, logits, positions[:, -1] + 1), [], 0
  for n, window in qwen3.decode_windows(prefix.shape[1], c, decode_chunks):
    carry, tokens_nb = jax.lax.scan(
        functools.partial(step, window=window), carry,
        jnp.arange(start, start + n))
    tokens.append(tokens_nb)
    start += n
  return jnp.concatenate(tokens).T


def coarse_to_fine_strip(tokenizer, tokens_bc) -> np.ndarray:
  """[B, len(ks), H, W, 3] decodes from the first k tokens, k in
  metrics.prefix_lengths(C): C/64 (at least 1) ... C/2, C."""
  tokens_bc = np.asarray(tokens_bc)  # Off the sampling mesh.
  ks = metrics.prefix_lengths(tokens_bc.shape[1])
  return np.stack([np.asarray(tokenizer.decode(tokens_bc[:, :k]))
                   for k in ks], axis=1)
