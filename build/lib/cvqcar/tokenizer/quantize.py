"""Vector quantizers: channel-wise (CVQ) and patch-wise (VQGAN baseline)."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from cvqcar import sharding
from cvqcar.kernels import argmin


class CodebookEma(nnx.Variable):
  """Codebook state updated by exponential moving averages, not gradients."""


class FrozenBasis(nnx.Variable):
  """A fixed random codebook basis (SimVQ); never trained."""


class QuantizerOutput(NamedTuple):
  quantized: jax.Array  # same shape as the input; straight-through gradient
  indices: jax.Array  # int32 token ids
  codebook_loss: jax.Array  # scalar, ||sg(z) - e||^2 over kept rows
  commitment_loss: jax.Array  # scalar, ||z - sg(e)||^2 over kept rows
  code_counts: jax.Array  # [K] hits per code over kept rows in this batch
  input_norm: jax.Array  # scalar, mean L2 norm of the kept rows looked up


def _l2_normalize(x: jax.Array, axis: int = -1) -> jax.Array:
  return x * jax.lax.rsqrt(jnp.sum(x * x, axis=axis, keepdims=True) + 1e-12)


def _masked_mean_sq(diff_nd: jax.Array, weight_n: jax.Array) -> jax.Array:
  per_row_n = jnp.mean(jnp.square(diff_nd.astype(jnp.float32)), axis=-1)
  return jnp.sum(per_row_n * weight_n) / jnp.maximum(jnp.sum(weight_n), 1.0)


def _input_norm(z_nd, weight_n):
  norm_n = jnp.sqrt(jnp.sum(jnp.square(
      jax.lax.stop_gradient(z_nd).astype(jnp.float32)), axis=-1))
  return jnp.sum(norm_n * weight_n) / jnp.maximum(jnp.sum(weight_n), 1.0)


def rotate_to(z_nd, e_nd):
  """The rotation trick's map of rows z onto codewords e (Fifty et al.
  2024, section 4.2): R z * |e| / |z| with R the rotation taking z/|z| to
  e/|e|, R and the scale held constant, so its value is e and the gradient
  to z is R^T (scaled) of the gradient at e."""
  eps = 1e-12
  z_norm = jnp.sqrt(jnp.sum(z_nd * z_nd, axis=-1, keepdims=True))
  e_norm = jnp.sqrt(jnp.sum(e_nd * e_nd, axis=-1, keepdims=True))
  u = jax.lax.stop_gradient(z_nd / jnp.maximum(z_norm, eps))
  q = jax.lax.stop_gradient(e_nd / jnp.maximum(e_norm, eps))
  w = _l2_normalize(u + q)
  rotated = (z_nd - 2 * jnp.sum(z_nd * w, -1, keepdims=True) * w +
             2 * jnp.sum(z_nd * u, -1, keepdims=True) * q)
  return rotated * jax.lax.stop_gradient(e_norm / jnp.maximum(z_norm, eps))


def estimate(z_nd, e_nd, *, rotation: bool = False):
  """Forward value e, gradient to z: the identity (straight-through) or,
  with `rotation`, that of the rotated, scaled row (rotation trick)."""
  if rotation:
    rotated_nd = rotate_to(z_nd, jax.lax.stop_gradient(e_nd))
    return jax.lax.stop_gradient(e_nd) + (
        rotated_nd - jax.lax.stop_gradient(rotated_nd))
  return z_nd + jax.lax.stop_gradient(e_nd - z_nd)


class VectorQuantizer(nnx.Module):
  """Nearest-codeword quantization of rows x [N, D] against K codewords.

  Options (all off gives the plain VQ-VAE quantizer):
    cosine: l2-normalise rows and codewords before the lookup.
    simvq: codebook = frozen random basis [K, D] @ trained linear map [D, D].
    ema: codewords follow EMA cluster means; dead codes (EMA count below
      `restart_fraction` of the mean count) restart from random batch rows.
    rotation: the rotation trick (Fifty et al. 2024) instead of the
      straight-through estimator: the gradient reaching the codeword is
      rotated and scaled onto the row (forward value still the codeword).
    index_backprop: IBQ (Shi et al. 2024): the code of largest logit x.e,
      and a straight-through one-hot over the softmax of all K logits, so
      every codeword gets gradient; its double quantization loss (see
      `_ibq`). Needs the full [N, K] logits (no fused search).
  """

  def __init__(
      self,
      num_codes: int,
      dim: int,
      *,
      cosine: bool = False,
      simvq: bool = False,
      ema: bool = False,
      ema_decay: float = 0.99,
      restart_fraction: float = 0.03,
      init_scale: float = 0.1,
      argmin_impl: str = "auto",
      rotation: bool = False,
      index_backprop: bool = False,
      rngs: nnx.Rngs,
  ):
    if simvq and ema:
      raise ValueError("simvq and ema codebooks are exclusive; pick one")
    if index_backprop and (ema or rotation):
      raise ValueError("index_backprop (IBQ) trains the codebook by gradient"
                       " through its own estimator: not with ema or rotation")
    self.num_codes, self.dim = num_codes, dim
    self.cosine, self.simvq, self.ema = cosine, simvq, ema
    self.rotation, self.index_backprop = rotation, index_backprop
    self.ema_decay, self.restart_fraction = ema_decay, restart_fraction
    self.argmin_impl = argmin_impl
    init = jax.random.normal(rngs.params(), (num_codes, dim)) * init_scale
    kd = ("codes", "code_dim")
    if simvq:
      self.basis_kd = FrozenBasis(init, logical_axes=kd)
      self.proj = nnx.Linear(
          dim, dim, use_bias=False, rngs=rngs,
          kernel_init=sharding.axes(nnx.initializers.orthogonal(),
                                    "code_dim", None))
    elif ema:
      self.codebook_kd = CodebookEma(init, logical_axes=kd)
      # Zero counts make every code "dead" at the first update, so the
      # codebook starts from rows of real data (a cheap k-means++-like init).
      self.ema_count_k = CodebookEma(jnp.zeros((num_codes,), jnp.float32),
                                     logical_axes=("codes",))
      self.ema_sum_kd = CodebookEma(jnp.zeros((num_codes, dim), jnp.float32),
                                    logical_axes=kd)
    else:
      self.codebook_kd = nnx.Param(init, logical_axes=kd)

  def codebook(self) -> jax.Array:
    """The effective [K, D] codebook used for lookup and decoding."""
    if self.simvq:
      codebook_kd = self.proj(self.basis_kd[...])
    else:
      codebook_kd = self.codebook_kd[...]
    return _l2_normalize(codebook_kd) if self.cosine else codebook_kd

  def lookup(self, indices: jax.Array) -> jax.Array:
    return jnp.take(self.codebook(), indices, axis=0)

  def set_codebook(self, codebook_kd: jax.Array, counts_k: jax.Array
                   ) -> None:
    """Starts the effective codebook at `codebook_kd` (k-means init); an
    EMA codebook takes `counts_k` (rows per code and batch) as its counts,
    SimVQ the basis its linear map sends there."""
    codebook_kd = codebook_kd.astype(jnp.float32)
    if self.simvq:
      kernel_dd = self.proj.kernel[...].astype(jnp.float32)  # basis @ W
      self.basis_kd[...] = jnp.linalg.solve(kernel_dd.T, codebook_kd.T).T
      return
    self.codebook_kd[...] = codebook_kd
    if self.ema:
      self.ema_count_k[...] = counts_k.astype(jnp.float32)
      self.ema_sum_kd[...] = codebook_kd * counts_k[:, None]

  def __call__(
      self,
      x_nd: jax.Array,
      weight_n: jax.Array | None = None,
      *,
      train: bool = False,
      key: jax.Array | None = None,
      indices_n: jax.Array | None = None,
  ) -> QuantizerOutput:
    """Quantizes rows; `weight_n` (0/1) marks rows that count in the losses.
    `indices_n`: codes already searched (by `search`), e.g. level by level
    in residual VQ; None searches here."""
    if x_nd.ndim != 2 or x_nd.shape[1] != self.dim:
      raise ValueError(
          f"quantizer expects rows [N, {self.dim}], got {x_nd.shape}"
      )
    if weight_n is None:
      weight_n = jnp.ones(x_nd.shape[:1], jnp.float32)
    weight_n = weight_n.astype(jnp.float32)
    z_nd = _l2_normalize(x_nd) if self.cosine else x_nd
    codebook_kd = self.codebook()
    if self.index_backprop:
      return self._ibq(x_nd, z_nd, codebook_kd, weight_n)
    if indices_n is None:
      indices_n = self._argmin(z_nd, codebook_kd)
    e_nd = jnp.take(codebook_kd, indices_n, axis=0)
    code_counts_k = jnp.zeros((self.num_codes,), jnp.float32).at[
        indices_n].add(weight_n)

    if self.ema and train:
      if key is None:
        raise ValueError("an EMA quantizer needs a PRNG key in training")
      self._ema_update(z_nd, indices_n, weight_n, code_counts_k, key)
      codebook_loss = jnp.zeros((), jnp.float32)
    else:
      codebook_loss = _masked_mean_sq(
          jax.lax.stop_gradient(z_nd) - e_nd, weight_n)
    commitment_loss = _masked_mean_sq(
        z_nd - jax.lax.stop_gradient(e_nd), weight_n)
    quantized_nd = estimate(z_nd, e_nd, rotation=self.rotation)
    return QuantizerOutput(quantized_nd.astype(x_nd.dtype), indices_n,
                           codebook_loss, commitment_loss, code_counts_k,
                           _input_norm(z_nd, weight_n))

  def search(self, x_nd: jax.Array) -> jax.Array:
    """The nearest codeword's index of each row [N] (no gradient)."""
    z_nd = _l2_normalize(x_nd) if self.cosine else x_nd
    return self._argmin(z_nd, self.codebook())

  def _argmin(self, z_nd, codebook_kd):
    return argmin.codebook_argmin(
        jax.lax.stop_gradient(z_nd).astype(jnp.float32),
        jax.lax.stop_gradient(codebook_kd).astype(jnp.float32),
        impl=self.argmin_impl)

  def _ibq(self, x_nd, z_nd, codebook_kd, weight_n) -> QuantizerOutput:
    """Index backpropagation. With p = softmax(z.e) over all codes and h the
    one-hot of its argmax, q = (h + p - sg(p)) E (forward value e_argmax,
    gradient through p to z and every codeword) and q2 = h E:
      codebook_loss = |q - z|^2 + |sg(q2) - z|^2, commitment = |q2 - sg(z)|^2
    (the trainer weighs the second by beta): the authors' double
    quantization loss, mean over kept rows."""
    z32, e32 = z_nd.astype(jnp.float32), codebook_kd.astype(jnp.float32)
    logits_nk = jnp.dot(z32, e32.T, precision=jax.lax.Precision.HIGHEST)
    soft_nk = jax.nn.softmax(logits_nk, axis=-1)
    indices_n = jnp.argmax(logits_nk, axis=-1).astype(jnp.int32)
    e_nd = jnp.take(e32, indices_n, axis=0)  # q2
    # (p - sg(p)) E is 0 in the forward pass: q's value is exactly e.
    quantized_nd = e_nd + jnp.dot(soft_nk - jax.lax.stop_gradient(soft_nk),
                                  e32)
    codebook_loss = (_masked_mean_sq(quantized_nd - z32, weight_n) +
                     _masked_mean_sq(jax.lax.stop_gradient(e_nd) - z32,
                                     weight_n))
    commitment_loss = _masked_mean_sq(e_nd - jax.lax.stop_gradient(z32),
                                      weight_n)
    code_counts_k = jnp.zeros((self.num_codes,), jnp.float32).at[
        indices_n].add(weight_n)
    return QuantizerOutput(quantized_nd.astype(x_nd.dtype), indices_n,
                           codebook_loss, commitment_loss, code_counts_k,
                           _input_norm(z_nd, weight_n))

  def _ema_update(self, z_nd, indices_n, weight_n, counts_k, key):
    z_nd = jax.lax.stop_gradient(z_nd).astype(jnp.float32)
    decay = self.ema_decay
    sums_kd = jnp.zeros((self.num_codes, self.dim), jnp.float32).at[
        indices_n].add(z_nd * weight_n[:, None])
    count_k = decay * self.ema_count_k[...] + (1 - decay) * counts_k
    sum_kd = decay * self.ema_sum_kd[...] + (1 - decay) * sums_kd
    # Restart codes that nobody picks from rows of this batch, so the
    # codebook cannot collapse onto a few codes on small data.
    mean_count = jnp.mean(count_k)
    dead_k = count_k < self.restart_fraction * mean_count
    rows_k = jax.random.choice(
        key, z_nd.shape[0], (self.num_codes,),
        p=weight_n / jnp.maximum(jnp.sum(weight_n), 1.0),
    )
    count_k = jnp.where(dead_k, mean_count, count_k)
    sum_kd = jnp.where(dead_k[:, None], z_nd[rows_k] * mean_count, sum_kd)
    self.ema_count_k[...] = count_k
    self.ema_sum_kd[...] = sum_kd
    self.codebook_kd[...] = sum_kd / jnp.maximum(count_k, 1e-6)[:, None]


def _lookup_rows(rows, tokens_bt, levels):
  """rows.lookup of tokens; `levels` only for residual quantizers."""
  if levels is None:
    return rows.lookup(tokens_bt)
  if not hasattr(rows, "depth"):
    raise ValueError(f"levels={levels}: only a residual quantizer (rvq) has"
                     " levels")
  return rows.lookup(tokens_bt, levels=levels)


class ChannelQuantizer(nnx.Module):
  """CVQ: each channel map (h*w numbers) of a [B, h, w, C] map is one token.

  `rows` quantizes the [B*C, h*w] maps: by default a VectorQuantizer built
  from the keyword arguments, or any quantizer of rows with its interface
  (scalar.FSQ, scalar.LFQ).
  """

  def __init__(self, num_codes: int, height: int, width: int, *, rows=None,
               **kwargs):
    self.height, self.width = height, width
    self.vq = rows or VectorQuantizer(num_codes, height * width, **kwargs)

  def num_tokens(self, num_channels: int) -> int:
    return num_channels

  def rows(self, z_bhwc: jax.Array) -> jax.Array:
    """The [B*C, h*w] channel maps that are quantized, image-major."""
    b, h, w, c = z_bhwc.shape
    return jnp.transpose(z_bhwc, (0, 3, 1, 2)).reshape(b * c, h * w)

  def __call__(self, z_bhwc, keep_bc=None, *, train=False, key=None):
    b, h, w, c = z_bhwc.shape
    if (h, w) != (self.height, self.width):
      raise ValueError(
          f"channel quantizer was built for {self.height}x{self.width} maps,"
          f" got {h}x{w}"
      )
    x_nd = self.rows(z_bhwc)
    weight_n = None if keep_bc is None else keep_bc.reshape(b * c)
    out = self.vq(x_nd, weight_n, train=train, key=key)
    quantized = out.quantized.reshape(b, c, h, w).transpose(0, 2, 3, 1)
    # Residual rows give `depth` codes each, adjacent: [B, C * depth].
    return out._replace(quantized=quantized,
                        indices=out.indices.reshape(b, -1))

  def lookup(self, tokens_bt: jax.Array, num_channels: int,
             levels: int | None = None) -> jax.Array:
    """Tokens [B, L] -> [B, h, w, C]: L <= C codes (residual: L <= C x
    depth, a channel's levels adjacent); channels past them are zero.
    `levels=d` (residual VQ) decodes from each token's first d codes."""
    b = tokens_bt.shape[0]
    maps_btd = _lookup_rows(self.vq, tokens_bt, levels)
    t = maps_btd.shape[1]
    maps_bcd = jnp.pad(maps_btd, ((0, 0), (0, num_channels - t), (0, 0)))
    return maps_bcd.reshape(b, num_channels, self.height, self.width
                            ).transpose(0, 2, 3, 1)


class PatchQuantizer(nnx.Module):
  """VQGAN baseline: each position's C-vector of a [B, h, w, C] map is one
  token; `rows` as for ChannelQuantizer."""

  def __init__(self, num_codes: int, num_channels: int, *, rows=None,
               **kwargs):
    self.vq = rows or VectorQuantizer(num_codes, num_channels, **kwargs)

  def __call__(self, z_bhwc, keep_bc=None, *, train=False, key=None):
    if keep_bc is not None:
      raise ValueError("nested channel dropout needs the channel quantizer")
    b, h, w, c = z_bhwc.shape
    out = self.vq(self.rows(z_bhwc), train=train, key=key)
    return out._replace(quantized=out.quantized.reshape(b, h, w, c),
                        indices=out.indices.reshape(b, -1))

  def rows(self, z_bhwc: jax.Array) -> jax.Array:
    """The [B*h*w, C] vectors that are quantized, image-major."""
    return z_bhwc.reshape(-1, z_bhwc.shape[-1])

  def lookup(self, tokens_bt, height: int, width: int,
             levels: int | None = None) -> jax.Array:
    """Tokens [B, h*w] (residual: [B, h*w*depth]) -> [B, h, w, C]."""
    b, t = tokens_bt.shape
    depth = getattr(self.vq, "depth", 1)
    if t != height * width * depth:
      raise ValueError(
          f"patch tokens must cover the {height}x{width} grid ({height * width}"
          f" tokens{f' x {depth} levels' if depth > 1 else ''}), got {t}"
      )
    return _lookup_rows(self.vq, tokens_bt, levels).reshape(
        b, height, width, -1)
