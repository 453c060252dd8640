"""DQ-VAE's dynamic quantization: one code or four per region of the grid.

Huang et al., "Towards Accurate Image Coding: Improved Autoregressive Image
Generation with Dynamic Vector Quantization" (CVPR 2023). The encoder's
s x s latent grid (the fine grid, downsample factor f) is cut into
R = (s/2)^2 regions of 2 x 2 cells (2f x 2f pixels). Each region is coded
either coarse, by one code of a pooled feature, or fine, by the four codes
of its cells, all from one shared codebook. A router picks per region
(Gumbel-softmax with a straight-through hard gate in training; at eval a
threshold calibrated on the training batches' logits, so the share coded
fine meets the target); a budget loss pulls the training share toward it. The
decoder reads the mixture on the fine grid: a coarse region's code fills
its four cells, and position embeddings (Fourier + learned, as the
original's decoder) let the four copies decode differently.

The router sees the region's features and its relative detail (the mean
squared deviation of its four cells from their mean, over their mean
square), so flat regions start out coarse and textured ones fine, at any
feature scale; the budget loss moves the threshold.

Token sequences (see `encode`): per image the coarse codes first, in
region order, then the fine codes by region and cell k = 2*di + dj;
position ids are r for coarse region r, R + 4r + k for fine cell k of
region r, and END = 5R pads a batch to the longest possible length 4R.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from cvqcar.tokenizer.quantize import QuantizerOutput, VectorQuantizer


class DynamicTokens(NamedTuple):
  """A batch of variable-length token sequences, padded to 4R."""
  codes: jax.Array  # [B, 4R] int32, 0 past the length
  positions: jax.Array  # [B, 4R] int32, END (= 5R) past the length
  lengths: jax.Array  # [B] int32, between R and 4R


class DynamicOutput(NamedTuple):
  vq: QuantizerOutput  # quantized: the mixture [B, s, s, C]
  fine_gate: jax.Array  # [B, R] hard 0/1 (straight-through in training)
  fine_prob: jax.Array  # [B, R] the router's probability of fine
  budget_loss: jax.Array  # scalar
  tokens: DynamicTokens


def to_regions(x_bhwc: jax.Array) -> jax.Array:
  """[B, s, s, C] -> [B, R, 4, C], cell k = 2*di + dj of each region."""
  b, h, w, c = x_bhwc.shape
  x = x_bhwc.reshape(b, h // 2, 2, w // 2, 2, c).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(b, (h // 2) * (w // 2), 4, c)


def from_regions(x_brkc: jax.Array, height: int, width: int) -> jax.Array:
  """Inverse of to_regions: [B, R, 4, C] -> [B, s, s, C]."""
  b, _, _, c = x_brkc.shape
  x = x_brkc.reshape(b, height // 2, width // 2, 2, 2, c)
  return x.transpose(0, 1, 3, 2, 4, 5).reshape(b, height, width, c)


def sequence(coarse_br, fine_brk, fine_br) -> DynamicTokens:
  """Per-region codes and the fine mask -> the padded token sequences."""
  b, r = coarse_br.shape
  codes = jnp.concatenate([coarse_br, fine_brk.reshape(b, 4 * r)], axis=1)
  valid = jnp.concatenate([~fine_br, jnp.repeat(fine_br, 4, axis=1)], axis=1)
  # Slot j holds position id j; a stable sort moves used slots to the front
  # in position order: coarse regions, then fine cells.
  order = jnp.argsort(~valid, axis=1, stable=True)[:, :4 * r]
  used = jnp.take_along_axis(valid, order, axis=1)
  return DynamicTokens(
      codes=jnp.where(used, jnp.take_along_axis(codes, order, axis=1), 0
                      ).astype(jnp.int32),
      positions=jnp.where(used, order, 5 * r).astype(jnp.int32),
      lengths=jnp.sum(valid, axis=1).astype(jnp.int32))


def unsequence(tokens: DynamicTokens, num_regions: int):
  """Inverse of `sequence`: (coarse codes [B, R], fine codes [B, R, 4],
  fine mask [B, R]). Entries past each length are ignored."""
  codes, positions, lengths = tokens
  b, length = codes.shape
  r = num_regions
  inside = jnp.arange(length)[None, :] < lengths[:, None]
  slot = jnp.where(inside, positions, 5 * r)  # padding to the END slot
  rows = jnp.arange(b)[:, None]
  buf = jnp.zeros((b, 5 * r + 1), jnp.int32).at[rows, slot].set(codes)
  seen = jnp.zeros((b, 5 * r + 1), bool).at[rows, slot].set(True)
  return (buf[:, :r], buf[:, r:5 * r].reshape(b, r, 4),
          seen[:, r:5 * r].reshape(b, r, 4)[..., 0])


POSITIONS = ("fourier+learned", "none")
ROUTERS = ("learned", "entropy")
ENTROPY_BINS, ENTROPY_SIGMA = 32, 0.01  # as the original's threshold tool


def patch_entropy(images_bhwc: jax.Array, regions_per_side: int
                  ) -> jax.Array:
  """[B, H, W, 3] in [-1, 1] -> [B, R] entropy (nats) of each region's grey
  levels, as the original entropy router measures it: grey = 0.2989 R +
  0.5870 G + 0.1140 B in [0, 1], a Gaussian-kernel histogram (sigma 0.01)
  over 32 bins in [0, 1], -sum p log p. Regions in row-major order."""
  b, h, w, _ = images_bhwc.shape
  n = regions_per_side
  rgb = (images_bhwc.astype(jnp.float32) + 1.0) / 2.0
  grey = jnp.tensordot(rgb, jnp.asarray([0.2989, 0.5870, 0.1140]), axes=1,
                       precision=jax.lax.Precision.HIGHEST)
  patches = grey.reshape(b, n, h // n, n, w // n).transpose(0, 1, 3, 2, 4)
  values_brp = patches.reshape(b, n * n, -1)
  bins = jnp.linspace(0.0, 1.0, ENTROPY_BINS)
  kernel = jnp.exp(-0.5 * jnp.square(
      (values_brp[..., None] - bins) / ENTROPY_SIGMA))
  pdf = jnp.mean(kernel, axis=2)  # [B, R, bins]
  # The original adds 1e-40, which float32 flushes to 0 on CPUs and TPUs
  # (0 * log 0 = NaN); 1e-30 changes the entropy by < 1e-27.
  eps = 1e-30
  pdf = pdf / (jnp.sum(pdf, axis=-1, keepdims=True) + eps) + eps
  return -jnp.sum(pdf * jnp.log(pdf), axis=-1)


class Calibration(nnx.Variable):
  """Router state set from training batches, not by gradients."""


class PositionEmbedding(nnx.Module):
  """What the decoder adds to the mixed latent so the four cells of a coarse
  region (one codeword copied) decode differently: Fourier features
  sin(W [x, y] + b) of coordinates in [-1, 1] plus learned row and column
  embeddings, as the original's 'fourier+learned' decoder (W ~ U(+-sqrt(9/2)),
  b ~ U(+-sqrt(1/2)) as its 1x1 conv; rows and columns ~ N(0, 1) cut at 2)."""

  def __init__(self, height: int, width: int, channels: int, *,
               rngs: nnx.Rngs):
    self.height, self.width = height, width
    bound = (9 / 2) ** 0.5
    self.fourier = nnx.Linear(
        2, channels, rngs=rngs,
        kernel_init=nnx.initializers.uniform(2 * bound),
        bias_init=nnx.initializers.uniform(2 * 0.5 ** 0.5))
    # nnx's uniform draws from [0, scale): centre both on zero.
    self.fourier.kernel[...] -= bound
    self.fourier.bias[...] -= 0.5 ** 0.5
    normal = nnx.initializers.truncated_normal(1.0, lower=-2.0, upper=2.0)
    self.rows_hc = nnx.Param(normal(rngs.params(), (height, channels)))
    self.cols_wc = nnx.Param(normal(rngs.params(), (width, channels)))

  def __call__(self, z_bhwc: jax.Array) -> jax.Array:
    y, x = jnp.meshgrid(jnp.linspace(-1.0, 1.0, self.height),
                        jnp.linspace(-1.0, 1.0, self.width), indexing="ij")
    fourier_hwc = jnp.sin(self.fourier(jnp.stack([x, y], axis=-1)))
    learned_hwc = self.rows_hc[...][:, None] + self.cols_wc[...][None]
    return z_bhwc + (fourier_hwc + learned_hwc).astype(z_bhwc.dtype)


class DynamicQuantizer(nnx.Module):
  """Coarse-or-fine quantization of a [B, s, s, C] latent (see module doc).

  `position='fourier+learned'` adds PositionEmbedding to the mixture the
  decoder reads ('none': the mixture as it is)."""

  def __init__(self, num_codes: int, num_channels: int, height: int,
               width: int, *, fine_fraction: float = 0.5,
               temperature: float = 1.0, position: str = "fourier+learned",
               calibration_decay: float = 0.99, router: str = "learned",
               pooled_coarse: bool = False, rngs: nnx.Rngs, **vq_kwargs):
    if height % 2 or width % 2:
      raise ValueError(f"dynamic quantization needs an even latent grid, got"
                       f" {height}x{width}")
    if not 0.0 <= fine_fraction <= 1.0:
      raise ValueError(f"fine_fraction must be in [0, 1], got {fine_fraction}")
    if not temperature > 0:  # 0: NaN gradients; < 0 inverts the gate
      raise ValueError("config.model.dynamic.temperature (the router's"
                       f" Gumbel-softmax) must be > 0, got {temperature}")
    if router not in ROUTERS:
      raise ValueError("config.model.dynamic.router must be one of"
                       f" {ROUTERS}, got {router!r}")
    self.router = router
    if position not in POSITIONS:
      raise ValueError("config.model.dynamic.position must be one of"
                       f" {POSITIONS}, got {position!r}")
    self.height, self.width = height, width
    self.num_regions = (height // 2) * (width // 2)
    if not 0.0 <= calibration_decay < 1.0:
      raise ValueError("config.model.dynamic.calibration_decay must be in"
                       f" [0, 1), got {calibration_decay}")
    self.fine_fraction, self.temperature = fine_fraction, temperature
    self.calibration_decay = calibration_decay
    # The logit above which a region is fine at eval: a running mean of the
    # training batches' (1 - fine_fraction) quantile of the router logits,
    # so `encode` codes the target share fine (training's Gumbel gate picks
    # fine with probability sigmoid(logit), which logit > 0 does not match).
    # NaN until the first training step: logit > 0 until then.
    self.eval_threshold = Calibration(jnp.full((), jnp.nan, jnp.float32))
    c = num_channels
    self.vq = VectorQuantizer(num_codes, c, rngs=rngs, **vq_kwargs)
    # Coarse features: the dual-grain encoder's (passed in), or a linear
    # map of a region's four fine cells (`pooled_coarse`, the older form).
    self.coarse = (nnx.Linear(4 * c, c, rngs=rngs) if pooled_coarse
                   else None)
    self.router_hidden = nnx.Linear(5 * c, c, rngs=rngs)
    self.router_out = nnx.Linear(
        c, 1, kernel_init=nnx.initializers.zeros, rngs=rngs)
    # fine logit = MLP(features) + detail_scale * log(detail) + 10 *
    # threshold: at init a region goes fine when its detail is over
    # e^-2 = 13.5%. The factor 10 lets the budget loss move the threshold
    # by a few units within hundreds of steps at the usual learning rates.
    self.detail_scale = nnx.Param(jnp.ones((), jnp.float32))
    self.threshold = nnx.Param(jnp.full((), 0.2, jnp.float32))
    self.position = (PositionEmbedding(height, width, c, rngs=rngs)
                     if position != "none" else None)

  def decoder_input(self, mixed_bhwc: jax.Array) -> jax.Array:
    """The mixed latent with the decoder's position signal added."""
    return mixed_bhwc if self.position is None else self.position(mixed_bhwc)

  def route(self, z_brkc: jax.Array) -> jax.Array:
    """The router's fine logit per region, [B, R]."""
    b, r, _, c = z_brkc.shape
    z = z_brkc.astype(jnp.float32)
    spread = jnp.mean(jnp.square(z - jnp.mean(z, axis=2, keepdims=True)),
                      axis=(2, 3))
    detail = jax.lax.stop_gradient(
        spread / (jnp.mean(jnp.square(z), axis=(2, 3)) + 1e-6))
    cells = z.reshape(b, r, 4 * c)
    pooled = jnp.mean(z, axis=2)
    h = nnx.gelu(self.router_hidden(jnp.concatenate([pooled, cells], -1)))
    return (self.router_out(h)[..., 0]
            + self.detail_scale[...] * jnp.log(detail + 1e-4)
            + 10.0 * self.threshold[...])

  def __call__(self, z_bhwc, *, train: bool = False, key=None,
               images=None, coarse_bhwc=None) -> DynamicOutput:
    """`z_bhwc`: the fine latent [B, s, s, C]; `coarse_bhwc`: the coarse
    one [B, s/2, s/2, C] (unless `pooled_coarse`); `images` [B, H, W, 3]:
    what the entropy router reads."""
    b, h, w, c = z_bhwc.shape
    if (h, w) != (self.height, self.width):
      raise ValueError(f"dynamic quantizer was built for {self.height}x"
                       f"{self.width} latents, got {h}x{w}")
    r = self.num_regions
    z_brkc = to_regions(z_bhwc)
    if self.coarse is not None:
      coarse_brc = self.coarse(z_brkc.reshape(b, r, 4 * c))
    elif coarse_bhwc is None or coarse_bhwc.shape != (b, h // 2, w // 2, c):
      raise ValueError(
          f"the dual-grain quantizer needs coarse features [{b}, {h // 2},"
          f" {w // 2}, {c}], got"
          f" {None if coarse_bhwc is None else coarse_bhwc.shape}")
    else:
      coarse_brc = coarse_bhwc.reshape(b, r, c)  # regions in row-major order
    vq_key = key
    if self.router == "entropy":
      if images is None:
        raise ValueError("the entropy router needs the images")
      # Fine where a region's grey levels are busiest: in training the
      # fine_fraction of the batch's regions of highest entropy (the exact
      # share; ties to the earlier region), at eval those over a running
      # mean of the batches' quantile. No learned gate, no budget loss.
      entropy_br = patch_entropy(images, h // 2)
      if train:
        self._calibrate(entropy_br)
        count = round(self.fine_fraction * entropy_br.size)
        order = jnp.argsort(-entropy_br.reshape(-1), stable=True)
        gate_br = jnp.zeros((entropy_br.size,), jnp.float32).at[
            order[:count]].set(1.0).reshape(entropy_br.shape)
      else:
        gate_br = (entropy_br > self.threshold_at_eval()).astype(
            jnp.float32)
      return self._quantize(z_bhwc, z_brkc, coarse_brc, gate_br, gate_br,
                            jnp.zeros((), jnp.float32), train, vq_key)
    logit_br = self.route(z_brkc)
    fine_prob = jax.nn.sigmoid(logit_br)
    vq_key = None
    if train:
      if key is None:
        raise ValueError("the dynamic quantizer needs a PRNG key in training")
      gate_key, vq_key = jax.random.split(key)
      # Binary Gumbel-softmax: logistic noise, hard forward, soft gradient.
      u = jax.random.uniform(gate_key, logit_br.shape, minval=1e-6,
                             maxval=1 - 1e-6)
      soft = jax.nn.sigmoid((logit_br + jnp.log(u) - jnp.log1p(-u))
                            / self.temperature)
      hard = (soft > 0.5).astype(jnp.float32)
      gate_br = hard + soft - jax.lax.stop_gradient(soft)
      self._calibrate(jax.lax.stop_gradient(logit_br))
    else:
      gate_br = (logit_br > self.threshold_at_eval()).astype(jnp.float32)
    budget = jnp.square(jnp.mean(gate_br) - self.fine_fraction)
    return self._quantize(z_bhwc, z_brkc, coarse_brc, gate_br, fine_prob,
                          budget, train, vq_key)

  def _quantize(self, z_bhwc, z_brkc, coarse_brc, gate_br, fine_prob,
                budget, train, vq_key) -> DynamicOutput:
    """Both granularities through one codebook lookup, mixed by the gate."""
    b, h, w, c = z_bhwc.shape
    r = self.num_regions
    fine_br = jax.lax.stop_gradient(gate_br) > 0.5
    # One lookup for both granularities: the shared codebook, and losses
    # and counts over the codes actually used.
    rows = jnp.concatenate([coarse_brc.reshape(b * r, c),
                            z_brkc.reshape(b * r * 4, c)], axis=0)
    weight = jnp.concatenate([(~fine_br).reshape(-1),
                              jnp.repeat(fine_br.reshape(-1), 4)])
    out = self.vq(rows, weight.astype(jnp.float32), train=train, key=vq_key)
    q_coarse = out.quantized[:b * r].reshape(b, r, 1, c)
    q_fine = out.quantized[b * r:].reshape(b, r, 4, c)
    g = gate_br[..., None, None].astype(q_fine.dtype)
    mixed = self.decoder_input(
        from_regions(g * q_fine + (1 - g) * q_coarse, h, w))
    idx_coarse = out.indices[:b * r].reshape(b, r)
    idx_fine = out.indices[b * r:].reshape(b, r, 4)
    return DynamicOutput(
        vq=out._replace(quantized=mixed), fine_gate=gate_br,
        fine_prob=fine_prob, budget_loss=budget,
        tokens=sequence(idx_coarse, idx_fine, fine_br))

  def threshold_at_eval(self) -> jax.Array:
    """The calibrated eval threshold (0 before any training step)."""
    tau = self.eval_threshold[...]
    return jnp.where(jnp.isnan(tau), 0.0, tau)

  def _calibrate(self, logit_br: jax.Array) -> None:
    quantile = jnp.quantile(logit_br.astype(jnp.float32),
                            1.0 - self.fine_fraction)
    tau, decay = self.eval_threshold[...], self.calibration_decay
    self.eval_threshold[...] = jnp.where(
        jnp.isnan(tau), quantile, decay * tau + (1 - decay) * quantile)

  def lookup(self, tokens: DynamicTokens) -> jax.Array:
    """Token sequences -> the [B, s, s, C] latent the decoder reads."""
    coarse_br, fine_brk, fine_br = unsequence(tokens, self.num_regions)
    q_coarse = self.vq.lookup(coarse_br)[:, :, None, :]
    q_fine = self.vq.lookup(fine_brk)
    g = fine_br[..., None, None]
    return self.decoder_input(from_regions(jnp.where(g, q_fine, q_coarse),
                                           self.height, self.width))
