"""Codebook-free quantizers of rows: FSQ, LFQ and BSQ.

Each quantizes rows x [N, D] (a channel map of h*w numbers, or a latent
location's C channels) like `quantize.VectorQuantizer`, through the same
`QuantizerOutput`, so the channel and patch quantizers take either:

- FSQ (Mentzer et al. 2023, finite scalar quantization): a learned linear
  map D -> d, each dimension bounded by tanh to L_i levels and rounded with
  a straight-through gradient, a map d -> D back. The codebook is implicit:
  K = prod(L_i) codes, index = the levels' mixed-radix number. No loss.
- LFQ (Yu et al. 2023, MAGVIT-v2's lookup-free quantization): d = log2 K
  dimensions, each quantized to its sign (+-1); index = the bits, the first
  dimension the most significant. Its entropy loss (mean per-row entropy of
  the softmax over all K codes of 2 x.c / temperature, minus gamma times the
  entropy of their mean) goes into `codebook_loss`, times its weight; the
  commitment loss is the mean squared distance to the code.
- BSQ (Zhao et al. 2024, binary spherical quantization): LFQ on the unit
  sphere, rows and codes l2-normalised (codes +-1 / sqrt(d)).

The formulas follow vector-quantize-pytorch (FSQ, LFQ with spherical=True
for BSQ), which the tests compare against on the same inputs.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from cvqcar.tokenizer.quantize import (
  QuantizerOutput,
  _input_norm,
  _l2_normalize,
  _masked_mean_sq,
)

_HIGHEST = jax.lax.Precision.HIGHEST


def _round_ste(x):
  return x + jax.lax.stop_gradient(jnp.round(x) - x)


class _Projection(nnx.Module):
  """D -> d and d -> D linear maps, or none when D == d."""

  def __init__(self, dim: int, code_dim: int, rngs: nnx.Rngs):
    self.needed = dim != code_dim
    if self.needed:
      self.inp = nnx.Linear(dim, code_dim, rngs=rngs)
      self.out = nnx.Linear(code_dim, dim, rngs=rngs)

  def project_in(self, x):
    return self.inp(x) if self.needed else x

  def project_out(self, x):
    return self.out(x) if self.needed else x


def _row_mean(per_row_n, weight_n):
  return jnp.sum(per_row_n * weight_n) / jnp.maximum(jnp.sum(weight_n), 1.0)


def _output(quantized_nd, indices_n, num_codes, weight_n, x_nd,
            codebook_loss=None, commitment_loss=None) -> QuantizerOutput:
  zero = jnp.zeros((), jnp.float32)
  counts_k = jnp.zeros((num_codes,), jnp.float32).at[indices_n].add(weight_n)
  return QuantizerOutput(
      quantized_nd.astype(x_nd.dtype), indices_n,
      zero if codebook_loss is None else codebook_loss,
      zero if commitment_loss is None else commitment_loss, counts_k,
      _input_norm(x_nd, weight_n))


def _check_rows(x_nd, dim):
  if x_nd.ndim != 2 or x_nd.shape[1] != dim:
    raise ValueError(f"quantizer expects rows [N, {dim}], got {x_nd.shape}")


class FSQ(nnx.Module):
  """Finite scalar quantization of rows [N, dim] with `levels` per code
  dimension (each level count >= 3)."""

  def __init__(self, levels, dim: int, *, rngs: nnx.Rngs):
    levels = tuple(int(v) for v in levels)
    if not levels or min(levels) < 3:
      raise ValueError(f"FSQ levels must each be >= 3, got {levels}")
    self.levels, self.dim = levels, dim
    self.num_codes = math.prod(levels)
    # Mixed-radix place values: the first dimension is the least significant.
    self.basis = tuple(int(v) for v in np.cumprod((1,) + levels[:-1]))
    self.proj = _Projection(dim, len(levels), rngs)

  def _bound(self, z_nd):
    levels = jnp.asarray(self.levels, jnp.float32)
    half_l = (levels - 1) * (1 + 1e-3) / 2
    offset = jnp.where(levels % 2 == 0, 0.5, 0.0)
    shift = jnp.arctanh(offset / half_l)
    return jnp.tanh(z_nd + shift) * half_l - offset

  def codes(self, z_nd):
    """Normalised codes in [-1, 1] (straight-through rounding)."""
    half_width = jnp.asarray([v // 2 for v in self.levels], jnp.float32)
    return _round_ste(self._bound(z_nd)) / half_width

  def codes_to_indices(self, codes_nd):
    half_width = jnp.asarray([v // 2 for v in self.levels], jnp.float32)
    digits = jnp.round(codes_nd * half_width + half_width).astype(jnp.int32)
    return jnp.sum(digits * jnp.asarray(self.basis, jnp.int32), axis=-1)

  def indices_to_codes(self, indices):
    digits = (indices[..., None] // jnp.asarray(self.basis, jnp.int32)
              ) % jnp.asarray(self.levels, jnp.int32)
    half_width = jnp.asarray([v // 2 for v in self.levels], jnp.float32)
    return (digits.astype(jnp.float32) - half_width) / half_width

  def lookup(self, indices):
    return self.proj.project_out(self.indices_to_codes(indices))

  def codebook(self):
    """Every code's row [K, dim] (the implicit codebook, projected)."""
    return self.lookup(jnp.arange(self.num_codes))

  def __call__(self, x_nd, weight_n=None, *, train=False, key=None
               ) -> QuantizerOutput:
    del train, key  # no state, no randomness
    _check_rows(x_nd, self.dim)
    weight_n = (jnp.ones(x_nd.shape[:1], jnp.float32) if weight_n is None
                else weight_n.astype(jnp.float32))
    codes_nd = self.codes(self.proj.project_in(x_nd.astype(jnp.float32)))
    indices_n = self.codes_to_indices(jax.lax.stop_gradient(codes_nd))
    return _output(self.proj.project_out(codes_nd), indices_n,
                   self.num_codes, weight_n, x_nd)


# Rows per chunk of LFQ's entropy: a [chunk, K] tile (64 MiB at K = 16,384).
ENTROPY_CHUNK = 1024


class LFQ(nnx.Module):
  """Lookup-free quantization of rows [N, dim] to K = 2**bits codes;
  `spherical` makes it BSQ."""

  def __init__(self, bits: int, dim: int, *, spherical: bool = False,
               entropy_weight: float = 0.1, diversity_gamma: float = 1.0,
               temperature: float = 0.01, rngs: nnx.Rngs):
    if not 1 <= bits <= 24:
      raise ValueError(f"LFQ/BSQ bits must be in 1..24, got {bits}")
    if temperature <= 0:
      raise ValueError(f"LFQ/BSQ temperature must be > 0, got {temperature}")
    self.bits, self.dim, self.spherical = bits, dim, spherical
    self.num_codes = 2 ** bits
    self.entropy_weight, self.diversity_gamma = entropy_weight, diversity_gamma
    self.temperature = temperature
    self.proj = _Projection(dim, bits, rngs)

  def _sphere(self, x):
    return _l2_normalize(x) if self.spherical else x

  def _place_values(self):
    return jnp.asarray([2 ** (self.bits - 1 - i) for i in range(self.bits)],
                       jnp.int32)

  def indices_to_codes(self, indices):
    bits = (indices[..., None] & self._place_values()) != 0
    return self._sphere(jnp.where(bits, 1.0, -1.0))

  def lookup(self, indices):
    return self.proj.project_out(self.indices_to_codes(indices))

  def codebook(self):
    """Every code's row [K, dim] (the implicit codebook, projected)."""
    return self.lookup(jnp.arange(self.num_codes))

  def entropy_loss(self, z_nd, weight_n):
    """Mean per-row entropy of p(code | row) minus gamma times the entropy
    of the rows' mean p, p = softmax(2 z.c / temperature) over all K codes.

    Rows go through in chunks of ENTROPY_CHUNK, each rematerialized in the
    backward pass, so no [N, K] matrix exists: at N = 65,536 rows and
    K = 16,384 codes the full one took 4 GiB a copy and the step ran out
    of memory (docs/benchmarks.md).
    """
    codebook_kd = self.indices_to_codes(jnp.arange(self.num_codes))
    log = lambda p: jnp.log(jnp.maximum(p, 1e-5))

    @jax.checkpoint
    def chunk_sums(z_cd, w_c):
      logits_ck = 2 * jnp.dot(z_cd, codebook_kd.T,
                              precision=_HIGHEST) / self.temperature
      p_ck = jax.nn.softmax(logits_ck, axis=-1)
      row_entropy_c = -jnp.sum(p_ck * log(p_ck), axis=-1)
      return jnp.sum(row_entropy_c * w_c), jnp.sum(p_ck * w_c[:, None], 0)

    n = z_nd.shape[0]
    chunk = min(n, ENTROPY_CHUNK)
    pad = -n % chunk  # padded rows weigh 0
    z_mcd = jnp.pad(z_nd, ((0, pad), (0, 0))).reshape(-1, chunk, self.bits)
    w_mc = jnp.pad(weight_n, (0, pad)).reshape(-1, chunk)

    def step(carry, inputs):
      entropy_sum, p_sum_k = carry
      e, p = chunk_sums(*inputs)
      return (entropy_sum + e, p_sum_k + p), None

    init = (jnp.zeros((), jnp.float32),
            jnp.zeros((self.num_codes,), jnp.float32))
    (entropy_sum, p_sum_k), _ = jax.lax.scan(step, init, (z_mcd, w_mc))
    total = jnp.maximum(jnp.sum(weight_n), 1.0)
    mean_p_k = p_sum_k / total
    codebook = -jnp.sum(mean_p_k * log(mean_p_k))
    return entropy_sum / total - self.diversity_gamma * codebook

  def __call__(self, x_nd, weight_n=None, *, train=False, key=None
               ) -> QuantizerOutput:
    del key
    _check_rows(x_nd, self.dim)
    weight_n = (jnp.ones(x_nd.shape[:1], jnp.float32) if weight_n is None
                else weight_n.astype(jnp.float32))
    z_nd = self._sphere(self.proj.project_in(x_nd.astype(jnp.float32)))
    positive_nd = z_nd > 0
    q_nd = self._sphere(jnp.where(positive_nd, 1.0, -1.0))
    indices_n = jnp.sum(positive_nd.astype(jnp.int32) * self._place_values(),
                        axis=-1)
    quantized_nd = z_nd + jax.lax.stop_gradient(q_nd - z_nd)
    commitment = _masked_mean_sq(z_nd - jax.lax.stop_gradient(q_nd),
                                 weight_n)
    entropy = (self.entropy_weight * self.entropy_loss(z_nd, weight_n)
               if train and self.entropy_weight else None)
    return _output(self.proj.project_out(quantized_nd), indices_n,
                   self.num_codes, weight_n, x_nd, entropy, commitment)
