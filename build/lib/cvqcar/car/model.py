"""CAR: next-channel prediction of CVQ tokens by a decoder-only LLM.

Sequence: [prompt tokens][begin-of-image][c_1 .. c_C]. A channel token enters
as its (frozen) CVQ codeword through a two-layer MLP projector; an image head
maps hidden states to logits over the K codes. Prompts are left-padded so the
image part sits at the same positions for every example; an empty prompt is
the unconditional case used by classifier-free guidance.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from cvqcar import sharding
from cvqcar.car import qwen3
from cvqcar.tokenizer import model as tokenizer_lib


class FrozenCodebook(nnx.Variable):
  """The tokenizer's [K, h*w] codebook: read by CAR, never trained."""


class CAR(nnx.Module):
  """Text-conditioned autoregression over C channel tokens."""

  def __init__(self, backbone: qwen3.Qwen3, codebook_kd: jax.Array,
               num_channels: int, *, num_classes: int = 0,
               rngs: nnx.Rngs):
    self.backbone = backbone
    self.num_channels = num_channels
    # Class-conditional: the prompt is one class index, embedded here, not
    # by the LLM's vocabulary (data.text.ClassTokenizer).
    self.num_classes = num_classes
    num_codes, code_dim = codebook_kd.shape
    width = backbone.config.hidden_size
    # A copy: the tokenizer keeps its own buffer (donation must not alias).
    self.codebook_kd = FrozenCodebook(jnp.array(codebook_kd, copy=True),
                                      logical_axes=("codes", "code_dim"))
    # The projector and head compute in float32 whatever their weights'
    # dtype (bf16 sampling copies too): K-way logits keep their ranking.
    dense = lambda i, o, names: nnx.Linear(
        i, o, rngs=rngs, dtype=jnp.float32,
        kernel_init=sharding.axes(nnx.initializers.lecun_normal(), *names),
        bias_init=sharding.axes(nnx.initializers.zeros_init(), names[1]))
    self.proj_in = dense(code_dim, width, ("code_dim", "embed"))
    self.proj_out = dense(width, width, ("mlp", "embed"))
    self.begin_image = nnx.Param(
        jax.random.normal(rngs.params(), (width,)) * 0.02,
        logical_axes=("embed",))
    if num_classes:
      self.class_embed = nnx.Embed(
          num_classes, width, rngs=rngs, embedding_init=sharding.axes(
              nnx.initializers.normal(0.02), None, "embed"))
    # The backbone's final norm already normalises the hidden states.
    self.head = nnx.Linear(
        width, num_codes, use_bias=False, rngs=rngs, dtype=jnp.float32,
        kernel_init=sharding.axes(nnx.initializers.lecun_normal(), "embed",
                                  "codes"))

  @property
  def num_codes(self) -> int:
    return self.codebook_kd[...].shape[0]

  def embed_image_tokens(self, tokens_bt: jax.Array) -> jax.Array:
    """Channel tokens [B, T] -> LLM inputs [B, T, D] via codeword + MLP."""
    tokenizer_lib.check_token_ids(tokens_bt, self.num_codes,
                                  "CAR.embed_image_tokens")
    codewords = jnp.take(self.codebook_kd[...], tokens_bt, axis=0)
    return self.proj_out(nnx.gelu(self.proj_in(codewords)))

  def prefix(self, text_bl: jax.Array, text_mask_bl: jax.Array):
    """Embeddings, positions and mask of [prompt][begin-of-image]."""
    b = text_bl.shape[0]
    text = (self.class_embed(text_bl) if self.num_classes
            else self.backbone.embed(text_bl))
    boi = jnp.broadcast_to(self.begin_image[...].astype(text.dtype),
                           (b, 1, text.shape[-1]))
    mask = jnp.concatenate([text_mask_bl.astype(bool),
                            jnp.ones((b, 1), bool)], axis=1)
    return jnp.concatenate([text, boi], axis=1), mask

  def image_logits(self, hidden_btd: jax.Array) -> jax.Array:
    return self.head(hidden_btd).astype(jnp.float32)

  def __call__(self, text_bl, text_mask_bl, tokens_bc) -> jax.Array:
    """Teacher-forced logits [B, C, K]: position t predicts channel t."""
    if tokens_bc.shape[1] != self.num_channels:
      raise ValueError(f"expected {self.num_channels} channel tokens, got"
                       f" {tokens_bc.shape}")
    prefix, mask = self.prefix(text_bl, text_mask_bl)
    images = self.embed_image_tokens(tokens_bc[:, :-1])
    x = jnp.concatenate([prefix, images.astype(prefix.dtype)], axis=1)
    mask = jnp.concatenate(
        [mask, jnp.ones(tokens_bc.shape[:1] + (images.shape[1],), bool)], 1)
    positions = positions_from_mask(mask)
    hidden, _ = self.backbone.forward_embeddings(
        sharding.constrain_batch(x), positions, attention_mask=mask)
    return sharding.constrain_batch(
        self.image_logits(hidden[:, -self.num_channels:]))


def trainable(stage: int):
  """nnx filter of what trains: stage I all but the backbone (projector,
  begin-of-image embedding, image head); stage II every Param."""
  if stage == 1:
    return nnx.All(nnx.Param, nnx.Not(nnx.PathContains("backbone")))
  if stage == 2:
    return nnx.Param
  raise ValueError(f"config.stage must be 1 or 2, got {stage}")


def positions_from_mask(mask_bt: jax.Array) -> jax.Array:
  """0, 1, 2... over the real tokens of left-padded rows (pads get 0)."""
  return jnp.maximum(jnp.cumsum(mask_bt.astype(jnp.int32), axis=1) - 1, 0)


def loss_fn(logits_bck: jax.Array, tokens_bc: jax.Array) -> jax.Array:
  """Mean cross-entropy over the C image tokens."""
  logp = jax.nn.log_softmax(logits_bck, axis=-1)
  picked = jnp.take_along_axis(logp, tokens_bc[..., None], axis=-1)[..., 0]
  return -jnp.mean(picked)


def drop_prompts(text_mask_bl: jax.Array, prob: float,
                 key: jax.Array) -> jax.Array:
  """Classifier-free guidance training: an all-padding (empty) prompt for a
  `prob` share of the batch."""
  keep_b = jax.random.uniform(key, text_mask_bl.shape[:1]) >= prob
  return text_mask_bl * keep_b[:, None].astype(text_mask_bl.dtype)


def guided_logits(cond, uncond, scale: float):
  """uncond + s (cond - uncond): s = 1 is conditional, s = 0 unconditional."""
  return uncond + scale * (cond - uncond)
