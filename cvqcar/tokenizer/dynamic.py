"""DQ-VAE's dynamic quantization: one code, four or sixteen per region.

Huang et al., "Towards Accurate Image Coding: Improved Autoregressive Image
Generation with Dynamic Vector Quantization" (CVPR 2023). The encoder's
s x s latent grid (the finest grid, downsample factor f) is cut into
regions of n x n cells, n = 2^(L-1) for L granularities (`levels`, 2 or 3).
Level g = 0..L-1 codes a region by 4^g codes: level 0 (coarse) by one code
of a feature from the encoder's coarsest stage (f * n), level L-1 (fine) by
its n x n cells, and level 1 of 3 (medium) by the 2 x 2 cells of the middle
stage. All levels share one codebook. A router picks each region's level
(training: binary Gumbel-softmax gates with a straight-through hard
forward, one per level boundary, sharing their noise so the gates nest; at
eval: thresholds at the target quantiles of the router's scores on
training batches, so the share at each level meets its target); a budget
loss pulls the training shares toward the targets. The decoder reads the
mixture on the finest grid: a code of a coarser level fills its cells, and
position embeddings (Fourier + learned, as the original's decoder) let the
copies decode differently.

The router sees the region's features and its relative detail (the mean
squared deviation of its cells from their mean, over their mean square),
so flat regions start out coarse and textured ones fine, at any feature
scale; the budget loss moves the thresholds.

Token sequences (see `sequence`): per image the level-0 codes first, in
region order, then level 1's by region and cell, and so on: cell
k = di * 2^g + dj (row-major within the region) of region r at level g
has position id offset_g + 4^g r + k, offset_g = R (4^0 + ... + 4^(g-1)).
END = offset_L (5R for two levels, 21R for three) pads a batch to the
longest possible length 4^(L-1) R. Ascending position ids, so every region
appears once, at one level.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from cvqcar.tokenizer.quantize import QuantizerOutput, VectorQuantizer

LEVELS = (2, 3)


class DynamicTokens(NamedTuple):
  """A batch of variable-length token sequences, padded to 4^(L-1) R."""
  codes: jax.Array  # [B, T] int32, 0 past the length
  positions: jax.Array  # [B, T] int32, END past the length
  lengths: jax.Array  # [B] int32, between R and 4^(L-1) R


class DynamicOutput(NamedTuple):
  vq: QuantizerOutput  # quantized: the mixture [B, s, s, C]
  fine_gate: jax.Array  # [B, R] hard 0/1 at the finest level (straight-
  # through in training)
  fine_prob: jax.Array  # [B, R] the router's probability of the finest
  budget_loss: jax.Array  # scalar
  tokens: DynamicTokens
  level: jax.Array  # [B, R] int32: each region's level, 0 (coarse)..L-1


class Format(NamedTuple):
  """The sequence format of R regions at L levels (see the module doc)."""
  num_regions: int
  levels: int = 2

  @property
  def offsets(self) -> tuple[int, ...]:  # L + 1 entries, the last is END
    out = [0]
    for g in range(self.levels):
      out.append(out[-1] + self.num_regions * 4 ** g)
    return tuple(out)

  @property
  def end(self) -> int:
    return self.offsets[-1]

  @property
  def max_len(self) -> int:
    return self.num_regions * 4 ** (self.levels - 1)

  @property
  def cells(self) -> int:  # finest cells per region
    return 4 ** (self.levels - 1)

  def tables(self):
    """numpy (level, region, cell) of every position id below END."""
    level, region, cell = [], [], []
    for g in range(self.levels):
      n = self.num_regions * 4 ** g
      ids = np.arange(n)
      level.append(np.full(n, g))
      region.append(ids // 4 ** g)
      cell.append(ids % 4 ** g)
    return (np.concatenate(level), np.concatenate(region),
            np.concatenate(cell))


def to_blocks(x_bhwc: jax.Array, n: int) -> jax.Array:
  """[B, s, s, C] -> [B, R, n*n, C]: blocks of n x n cells in row-major
  order, cell k = di * n + dj within each."""
  b, h, w, c = x_bhwc.shape
  x = x_bhwc.reshape(b, h // n, n, w // n, n, c).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(b, (h // n) * (w // n), n * n, c)


def from_blocks(x_brkc: jax.Array, height: int, width: int, n: int
                ) -> jax.Array:
  """Inverse of to_blocks: [B, R, n*n, C] -> [B, s, s, C]."""
  b, _, _, c = x_brkc.shape
  x = x_brkc.reshape(b, height // n, width // n, n, n, c)
  return x.transpose(0, 1, 3, 2, 4, 5).reshape(b, height, width, c)


def to_regions(x_bhwc: jax.Array) -> jax.Array:
  """[B, s, s, C] -> [B, R, 4, C], cell k = 2*di + dj of each 2 x 2."""
  return to_blocks(x_bhwc, 2)


def from_regions(x_brkc: jax.Array, height: int, width: int) -> jax.Array:
  """Inverse of to_regions: [B, R, 4, C] -> [B, s, s, C]."""
  return from_blocks(x_brkc, height, width, 2)


def cell_of_finest(levels: int, g: int) -> np.ndarray:
  """For each finest cell k of a region (row-major, n = 2^(L-1) a side),
  the index of the level-g cell that covers it."""
  n, d = 2 ** (levels - 1), levels - 1 - g
  i, j = np.divmod(np.arange(n * n), n)
  return (i >> d) * 2 ** g + (j >> d)


def sequence_levels(codes: Sequence[jax.Array], level_br: jax.Array
                    ) -> DynamicTokens:
  """Per-level codes (level g: [B, R, 4^g]) and each region's level [B, R]
  -> the padded token sequences."""
  b, r = level_br.shape
  fmt = Format(r, len(codes))
  flat = jnp.concatenate([c.reshape(b, -1) for c in codes], axis=1)
  valid = jnp.concatenate([jnp.repeat(level_br == g, 4 ** g, axis=1)
                           for g in range(fmt.levels)], axis=1)
  # Slot j holds position id j; a stable sort moves used slots to the front
  # in position order.
  order = jnp.argsort(~valid, axis=1, stable=True)[:, :fmt.max_len]
  used = jnp.take_along_axis(valid, order, axis=1)
  return DynamicTokens(
      codes=jnp.where(used, jnp.take_along_axis(flat, order, axis=1), 0
                      ).astype(jnp.int32),
      positions=jnp.where(used, order, fmt.end).astype(jnp.int32),
      lengths=jnp.sum(valid, axis=1).astype(jnp.int32))


def unsequence_levels(tokens: DynamicTokens, num_regions: int, levels: int):
  """Inverse of `sequence_levels`: (per-level codes, level g [B, R, 4^g];
  each region's level [B, R]). Entries past each length are ignored."""
  codes, positions, lengths = tokens
  b, length = codes.shape
  fmt = Format(num_regions, levels)
  inside = jnp.arange(length)[None, :] < lengths[:, None]
  slot = jnp.where(inside, positions, fmt.end)  # padding to the END slot
  rows = jnp.arange(b)[:, None]
  buf = jnp.zeros((b, fmt.end + 1), jnp.int32).at[rows, slot].set(codes)
  seen = jnp.zeros((b, fmt.end + 1), bool).at[rows, slot].set(True)
  off, r = fmt.offsets, num_regions
  per_level = [buf[:, off[g]:off[g + 1]].reshape(b, r, 4 ** g)
               for g in range(levels)]
  level = sum(g * seen[:, off[g]:off[g + 1]].reshape(b, r, 4 ** g)[..., 0]
              for g in range(1, levels))
  return per_level, jnp.asarray(level, jnp.int32)


def sequence(coarse_br, fine_brk, fine_br) -> DynamicTokens:
  """Two levels: coarse codes [B, R], fine codes [B, R, 4] and the fine
  mask [B, R] -> the padded token sequences."""
  return sequence_levels([coarse_br[..., None], fine_brk],
                         fine_br.astype(jnp.int32))


def unsequence(tokens: DynamicTokens, num_regions: int):
  """Two levels: (coarse codes [B, R], fine codes [B, R, 4], fine mask)."""
  (coarse, fine), level = unsequence_levels(tokens, num_regions, 2)
  return coarse[..., 0], fine, level == 1


def level_shares(tokens: DynamicTokens, num_regions: int, levels: int
                 ) -> jax.Array:
  """[B, L]: each image's share of regions at each level."""
  fmt = Format(num_regions, levels)
  off = fmt.offsets
  inside = jnp.arange(tokens.codes.shape[1])[None] < tokens.lengths[:, None]
  pos = jnp.where(inside, tokens.positions, fmt.end)
  return jnp.stack([jnp.sum((pos >= off[g]) & (pos < off[g + 1]), axis=1)
                    / (4 ** g * num_regions) for g in range(levels)], axis=1)


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
  """Level-per-region quantization of a [B, s, s, C] latent (see the module
  doc). `levels` 2 (coarse / fine) or 3 (coarse / medium / fine);
  `fine_fraction` and (three levels) `medium_fraction` are the target shares
  of regions at the finest and the middle level.

  `position='fourier+learned'` adds PositionEmbedding to the mixture the
  decoder reads ('none': the mixture as it is)."""

  def __init__(self, num_codes: int, num_channels: int, height: int,
               width: int, *, fine_fraction: float = 0.5,
               medium_fraction: float = 0.0, levels: int = 2,
               temperature: float = 1.0, position: str = "fourier+learned",
               calibration_decay: float = 0.99, router: str = "learned",
               pooled_coarse: bool = False, rngs: nnx.Rngs, **vq_kwargs):
    if levels not in LEVELS:
      raise ValueError(f"config.model.dynamic.levels must be one of {LEVELS},"
                       f" got {levels!r}")
    n = 2 ** (levels - 1)
    if height % n or width % n:
      raise ValueError(f"dynamic quantization at {levels} levels needs a"
                       f" latent grid divisible by {n}, got {height}x{width}")
    if not 0.0 <= fine_fraction <= 1.0:
      raise ValueError(f"fine_fraction must be in [0, 1], got {fine_fraction}")
    if levels == 2 and medium_fraction:
      raise ValueError("config.model.dynamic.medium_fraction needs levels=3,"
                       f" got {medium_fraction} at levels=2")
    if not 0.0 <= medium_fraction <= 1.0 - fine_fraction:
      raise ValueError("config.model.dynamic.medium_fraction must be in"
                       f" [0, 1 - fine_fraction], got {medium_fraction}"
                       f" with fine_fraction {fine_fraction}")
    if not temperature > 0:  # 0: NaN gradients; < 0 inverts the gate
      raise ValueError("config.model.dynamic.temperature (the router's"
                       f" Gumbel-softmax) must be > 0, got {temperature}")
    if router not in ROUTERS:
      raise ValueError("config.model.dynamic.router must be one of"
                       f" {ROUTERS}, got {router!r}")
    if position not in POSITIONS:
      raise ValueError("config.model.dynamic.position must be one of"
                       f" {POSITIONS}, got {position!r}")
    if not 0.0 <= calibration_decay < 1.0:
      raise ValueError("config.model.dynamic.calibration_decay must be in"
                       f" [0, 1), got {calibration_decay}")
    if pooled_coarse and levels != 2:
      raise ValueError("the pooled coarse features (dynamic.encoder="
                       "'pooled') have two levels only; use encoder='dual'")
    self.router, self.levels, self.side = router, levels, n
    self.height, self.width = height, width
    self.num_regions = (height // n) * (width // n)
    self.format = Format(self.num_regions, levels)
    self.fine_fraction, self.medium_fraction = fine_fraction, medium_fraction
    self.temperature = temperature
    self.calibration_decay = calibration_decay
    # The score above which a region is coded at level >= k at eval, one
    # per level boundary k = 1..L-1: the (1 - target) quantiles of the
    # router's scores on training images, measured with the weights eval
    # uses (the trainer sets them before each eval and checkpoint;
    # `calibrate` keeps a running mean), so `encode` meets the targets
    # (training's Gumbel gate picks by sigmoid(logit), which logit > 0 does
    # not match). NaN until the first calibration.
    shape = () if levels == 2 else (levels - 1,)
    self.eval_threshold = Calibration(jnp.full(shape, jnp.nan, jnp.float32))
    c = num_channels
    self.vq = VectorQuantizer(num_codes, c, rngs=rngs, **vq_kwargs)
    # Coarse features: the dual-grain encoder's (passed in), or a linear
    # map of a region's four fine cells (`pooled_coarse`, the older form).
    self.coarse = (nnx.Linear(4 * c, c, rngs=rngs) if pooled_coarse
                   else None)
    self.router_hidden = nnx.Linear((1 + n * n) * c, c, rngs=rngs)
    self.router_out = nnx.Linear(
        c, 1, kernel_init=nnx.initializers.zeros, rngs=rngs)
    # logit of level >= 1 = MLP(features) + detail_scale * log(detail) + 10
    # * threshold: at init a region goes finer when its detail is over
    # e^-2 = 13.5%. The factor 10 lets the budget loss move the threshold
    # by a few units within hundreds of steps at the usual learning rates.
    self.detail_scale = nnx.Param(jnp.ones((), jnp.float32))
    self.threshold = nnx.Param(jnp.full((), 0.2, jnp.float32))
    if levels == 3:
      # Level >= 2 (fine) needs a logit 10 * softplus(gap) higher: the
      # gates nest. At init 2 units: a detail e^2 times larger.
      self.threshold_gap = nnx.Param(
          jnp.full((), np.log(np.expm1(0.2)), jnp.float32))
    self.position = (PositionEmbedding(height, width, c, rngs=rngs)
                     if position != "none" else None)

  @property
  def targets(self) -> tuple[float, ...]:
    """The target share of regions at level >= k, for k = 1..L-1."""
    if self.levels == 2:
      return (self.fine_fraction,)
    return (self.medium_fraction + self.fine_fraction, self.fine_fraction)

  def decoder_input(self, mixed_bhwc: jax.Array) -> jax.Array:
    """The mixed latent with the decoder's position signal added."""
    return mixed_bhwc if self.position is None else self.position(mixed_bhwc)

  def route(self, z_brkc: jax.Array) -> jax.Array:
    """The router's logit of level >= 1 per region, [B, R]; [B, R, n*n, C]
    in (the finest cells of each region)."""
    return self._route_score(z_brkc) + 10.0 * self.threshold[...]

  def _route_score(self, z_brkc: jax.Array) -> jax.Array:
    """`route` without its learned threshold: what eval ranks by."""
    b, r, k, c = z_brkc.shape
    z = z_brkc.astype(jnp.float32)
    spread = jnp.mean(jnp.square(z - jnp.mean(z, axis=2, keepdims=True)),
                      axis=(2, 3))
    detail = jax.lax.stop_gradient(
        spread / (jnp.mean(jnp.square(z), axis=(2, 3)) + 1e-6))
    cells = z.reshape(b, r, k * c)
    pooled = jnp.mean(z, axis=2)
    h = nnx.gelu(self.router_hidden(jnp.concatenate([pooled, cells], -1)))
    return (self.router_out(h)[..., 0]
            + self.detail_scale[...] * jnp.log(detail + 1e-4))

  def _boundary_offsets(self) -> list[jax.Array]:
    """What each boundary's training logit is below level >= 1's."""
    out = [jnp.zeros((), jnp.float32)]
    if self.levels == 3:
      out.append(10.0 * nnx.softplus(self.threshold_gap[...]))
    return out

  def scores(self, z_bhwc=None, images=None) -> jax.Array:
    """The score [B, R] the eval thresholds cut: the learned router's
    logit less its learned threshold (a bias the budget loss moves fast;
    eval ranks regions without it, so the calibration need not track it),
    or the entropy router's patch entropy."""
    if self.router == "entropy":
      if images is None:
        raise ValueError("the entropy router needs the images")
      return patch_entropy(images, self.height // self.side)
    return self._route_score(to_blocks(z_bhwc, self.side))

  def calibrate(self, scores_br: jax.Array, decay: float | None = None
                ) -> None:
    """Moves the eval thresholds toward the target quantiles of these
    scores: a running mean with `decay` (default calibration_decay; 0 sets
    them)."""
    q = jnp.quantile(scores_br.astype(jnp.float32).reshape(-1),
                     1.0 - jnp.asarray(self.targets, jnp.float32))
    q = q.reshape(self.eval_threshold[...].shape)
    tau = self.eval_threshold[...]
    decay = self.calibration_decay if decay is None else decay
    self.eval_threshold[...] = jnp.where(
        jnp.isnan(tau), q, decay * tau + (1 - decay) * q)

  def threshold_at_eval(self) -> jax.Array:
    """The calibrated eval thresholds [L-1] (0 before any calibration)."""
    tau = self.eval_threshold[...].reshape(-1)
    return jnp.where(jnp.isnan(tau), 0.0, tau)

  def _grains(self, z_bhwc, coarse_bhwc):
    """Per-level features, level g: [B, R, 4^g, C]."""
    b, h, w, c = z_bhwc.shape
    n, r = self.side, self.num_regions
    fine = to_blocks(z_bhwc, n)
    if self.coarse is not None:
      return [self.coarse(fine.reshape(b, r, 4 * c))[:, :, None], fine]
    coarser = (tuple(coarse_bhwc) if isinstance(coarse_bhwc, tuple | list)
               else (coarse_bhwc,))
    want = [(b, h // 2 ** (self.levels - 1 - g), w // 2 **
             (self.levels - 1 - g), c) for g in range(self.levels - 1)]
    got = [None if x is None else x.shape for x in coarser]
    if got != want:
      raise ValueError(f"the dual-grain quantizer at {self.levels} levels"
                       f" needs coarse features {want} (coarsest first),"
                       f" got {got}")
    return [to_blocks(x, 2 ** g) for g, x in enumerate(coarser)] + [fine]

  def __call__(self, z_bhwc, *, train: bool = False, key=None,
               images=None, coarse_bhwc=None) -> DynamicOutput:
    """`z_bhwc`: the finest latent [B, s, s, C]; `coarse_bhwc`: the coarser
    ones (unless `pooled_coarse`): [B, s/2, s/2, C] at two levels, a tuple
    ([B, s/4, s/4, C], [B, s/2, s/2, C]) at three; `images` [B, H, W, 3]:
    what the entropy router reads. Training does not calibrate the eval
    thresholds: `calibrate` does, from the weights eval uses."""
    b, h, w, c = z_bhwc.shape
    if (h, w) != (self.height, self.width):
      raise ValueError(f"dynamic quantizer was built for {self.height}x"
                       f"{self.width} latents, got {h}x{w}")
    grains = self._grains(z_bhwc, coarse_bhwc)
    if self.router == "entropy":
      # Busiest regions finest: in training the exact target shares of the
      # batch's regions by entropy (ties to the earlier region), at eval
      # the calibrated thresholds. No learned gate, no budget loss.
      entropy_br = self.scores(images=images)
      if train:
        order = jnp.argsort(-entropy_br.reshape(-1), stable=True)
        rank = jnp.zeros((entropy_br.size,), jnp.int32).at[order].set(
            jnp.arange(entropy_br.size)).reshape(entropy_br.shape)
        gates = [(rank < round(t * entropy_br.size)).astype(jnp.float32)
                 for t in self.targets]
      else:
        gates = [(entropy_br > tau).astype(jnp.float32)
                 for tau in self.threshold_at_eval()]
      return self._quantize(z_bhwc, grains, gates, gates[-1],
                            jnp.zeros((), jnp.float32), train, key)
    logit_br = self.route(grains[-1])
    logits = [logit_br - o for o in self._boundary_offsets()]
    fine_prob = jax.nn.sigmoid(logits[-1])
    vq_key = None
    if train:
      if key is None:
        raise ValueError("the dynamic quantizer needs a PRNG key in training")
      gate_key, vq_key = jax.random.split(key)
      # Binary Gumbel-softmax per boundary, one logistic noise per region
      # (the gates nest): hard forward, soft gradient.
      u = jax.random.uniform(gate_key, logit_br.shape, minval=1e-6,
                             maxval=1 - 1e-6)
      noise = jnp.log(u) - jnp.log1p(-u)
      gates = []
      for logit in logits:
        soft = jax.nn.sigmoid((logit + noise) / self.temperature)
        hard = (soft > 0.5).astype(jnp.float32)
        gates.append(hard + soft - jax.lax.stop_gradient(soft))
    else:
      # Before any calibration: the training gates' logit > 0.
      score = logit_br - 10.0 * self.threshold[...]
      raw = self.eval_threshold[...].reshape(-1)
      gates = [(score > jnp.where(jnp.isnan(tau), o - 10.0 *
                                  self.threshold[...], tau)
                ).astype(jnp.float32)
               for tau, o in zip(raw, self._boundary_offsets(), strict=True)]
    budget = sum(jnp.square(jnp.mean(g) - t)
                 for g, t in zip(gates, self.targets, strict=True))
    return self._quantize(z_bhwc, grains, gates, fine_prob, budget, train,
                          vq_key)

  def _quantize(self, z_bhwc, grains, gates, fine_prob, budget, train,
                vq_key) -> DynamicOutput:
    """Every level through one codebook lookup, mixed by the gates."""
    b, h, w, c = z_bhwc.shape
    r, levels = self.num_regions, self.levels
    hard = [jax.lax.stop_gradient(g) > 0.5 for g in gates]
    level_br = sum(x.astype(jnp.int32) for x in hard)
    # One lookup for all levels: the shared codebook, and losses and counts
    # over the codes actually used.
    rows = jnp.concatenate([x.reshape(-1, c) for x in grains], axis=0)
    weight = jnp.concatenate([jnp.repeat((level_br == g).reshape(-1), 4 ** g)
                              for g in range(levels)])
    out = self.vq(rows, weight.astype(jnp.float32), train=train, key=vq_key)
    sizes = [b * r * 4 ** g for g in range(levels)]
    starts = np.cumsum([0] + sizes)
    quantized = [out.quantized[starts[g]:starts[g + 1]].reshape(
        b, r, 4 ** g, c) for g in range(levels)]
    indices = [out.indices[starts[g]:starts[g + 1]].reshape(b, r, 4 ** g)
               for g in range(levels)]
    # Level weights: 1 - gate_1, gate_g - gate_(g+1), gate_(L-1): one-hot
    # forward, the gates' soft gradient.
    weights = ([1 - gates[0]] + [gates[g] - gates[g + 1]
                                 for g in range(levels - 2)] + [gates[-1]])
    mixed = sum(wt[..., None, None].astype(q.dtype)
                * q[:, :, cell_of_finest(levels, g)]
                for g, (wt, q) in enumerate(zip(weights, quantized,
                                                strict=True)))
    mixed = self.decoder_input(from_blocks(mixed, h, w, self.side))
    return DynamicOutput(
        vq=out._replace(quantized=mixed), fine_gate=gates[-1],
        fine_prob=fine_prob, budget_loss=budget,
        tokens=sequence_levels(indices, level_br), level=level_br)

  def lookup(self, tokens: DynamicTokens) -> jax.Array:
    """Token sequences -> the [B, s, s, C] latent the decoder reads."""
    per_level, level_br = unsequence_levels(tokens, self.num_regions,
                                            self.levels)
    mixed = None
    for g, codes in enumerate(per_level):
      q = self.vq.lookup(codes)[:, :, cell_of_finest(self.levels, g)]
      mixed = q if mixed is None else jnp.where(
          (level_br == g)[..., None, None], q, mixed)
    return self.decoder_input(from_blocks(mixed, self.height, self.width,
                                          self.side))
