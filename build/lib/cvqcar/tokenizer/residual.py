"""Residual VQ (RQ-VAE, Lee et al. 2022): D codes per token, coarse to fine.

Level 0 quantizes the row, level l the residual the levels before it left;
the token's vector is the sum of its D codewords, so the first levels alone
decode a coarser image. All levels share one codebook (RQ-VAE's choice;
vector-quantize-pytorch's `shared_codebook=True`), so a code id means the
same codeword at every level and the codebook is updated once a step.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from cvqcar.tokenizer import quantize


class ResidualQuantizer(nnx.Module):
  """Rows [N, D] -> `depth` codes each ([N, depth], level 0 first) from the
  codebook of `vq`, a VectorQuantizer whose options (EMA, cosine, SimVQ,
  rotation, Pallas search) apply at every level.

  Losses are the codebook's over the D x N level rows: level l's row is
  z - sg(e_0 + ... + e_{l-1}), so its commitment term is RQ-VAE's
  |z - sg(e_0 + ... + e_l)|^2, averaged over levels. The estimator maps z
  to the sum of its codewords with the identity (or rotation) gradient.
  """

  def __init__(self, vq: quantize.VectorQuantizer, depth: int):
    if depth < 1:
      raise ValueError(f"residual depth must be >= 1, got {depth}")
    if vq.index_backprop:
      raise ValueError("residual VQ searches level by level: not with"
                       " index_backprop (IBQ)")
    self.vq, self.depth = vq, depth
    self.num_codes, self.dim = vq.num_codes, vq.dim

  def codebook(self) -> jax.Array:
    return self.vq.codebook()

  def lookup(self, indices: jax.Array, levels: int | None = None
             ) -> jax.Array:
    """Codes [..., L] (each token's `depth` levels adjacent; a last token
    may be cut short) -> token vectors [..., ceil(L / depth), D], the sum
    of each token's first `levels` codewords (all by default)."""
    levels = self.depth if levels is None else levels
    if not 1 <= levels <= self.depth:
      raise ValueError(f"levels must be in 1..{self.depth}, got {levels}")
    length = indices.shape[-1]
    tokens = -(-length // self.depth)
    pad = tokens * self.depth - length
    codes = jnp.pad(indices, [(0, 0)] * (indices.ndim - 1) + [(0, pad)])
    used = (jnp.arange(tokens * self.depth) < length) & (
        jnp.arange(tokens * self.depth) % self.depth < levels)
    codebook_kd = self.codebook()
    rows = jnp.take(codebook_kd, codes, axis=0) * used[:, None].astype(
        codebook_kd.dtype)
    return rows.reshape(*indices.shape[:-1], tokens, self.depth,
                        self.dim).sum(axis=-2)

  def __call__(self, x_nd: jax.Array, weight_n: jax.Array | None = None, *,
               train: bool = False, key: jax.Array | None = None
               ) -> quantize.QuantizerOutput:
    n = x_nd.shape[0]
    if weight_n is None:
      weight_n = jnp.ones((n,), jnp.float32)
    codebook_kd = jax.lax.stop_gradient(self.vq.codebook())
    residual_nd, rows, codes = x_nd, [], []
    for _ in range(self.depth):
      rows.append(residual_nd)
      codes.append(self.vq.search(residual_nd))
      residual_nd = residual_nd - jnp.take(codebook_kd, codes[-1],
                                           axis=0).astype(x_nd.dtype)
    out = self.vq(jnp.concatenate(rows), jnp.tile(weight_n, self.depth),
                  train=train, key=key, indices_n=jnp.concatenate(codes))
    # The forward values of the level rows are their codewords e_l.
    total_nd = jnp.sum(jax.lax.stop_gradient(out.quantized).reshape(
        self.depth, n, self.dim), axis=0)
    quantized_nd = quantize.estimate(x_nd, total_nd,
                                     rotation=self.vq.rotation)
    return out._replace(
        quantized=quantized_nd.astype(x_nd.dtype),
        indices=jnp.stack(codes, axis=1),
        input_norm=quantize._input_norm(x_nd, weight_n))
