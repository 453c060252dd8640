"""The image tokenizer: encoder, channel- or patch-wise quantizer, decoder."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from cvqcar.tokenizer import dynamic, quantize, residual, scalar, vqgan

if TYPE_CHECKING:  # annotations only: the model builds from any mapping
  import ml_collections

QUANTIZERS = ("channel", "patch", "dynamic")
# What quantizes each token's row (config.model.quantizer).
ROW_QUANTIZERS = ("vq", "fsq", "lfq", "bsq")


def implied_num_codes(cfg: ml_collections.ConfigDict) -> int:
  """K of the configured row quantizer: num_codes for 'vq', prod(levels)
  for FSQ, 2**bits for LFQ / BSQ."""
  name = cfg.get("quantizer", "vq")
  if name == "fsq":
    return math.prod(cfg.scalar.fsq_levels)
  if name in ("lfq", "bsq"):
    return 2 ** cfg.scalar.bits
  return cfg.num_codes


class ForwardOutput(NamedTuple):
  reconstructions: jax.Array  # [B, H, W, 3]
  decoder_features: jax.Array  # input of the decoder's last conv
  indices: jax.Array  # [B, T] int32
  codebook_loss: jax.Array
  commitment_loss: jax.Array
  code_counts: jax.Array  # [K]
  channels_kept: jax.Array  # [B] int32, C where no dropout applied
  latent_norm: jax.Array  # mean L2 norm of the token vectors looked up
  index_weight: jax.Array  # [B, T] 1 for tokens in use (dynamic pads)
  budget_loss: jax.Array  # dynamic: (fine share - target)^2, else 0
  fine_share: jax.Array  # dynamic: share of regions coded fine, else 0
  # dynamic: [B, R] each region's level (0 coarse .. L-1 fine), else [B, 0]
  region_level: jax.Array


def check_model_config(cfg: ml_collections.ConfigDict) -> None:
  """Raises a ValueError naming the first inconsistent model field."""
  if cfg.quantize not in QUANTIZERS:
    raise ValueError(
        f"config.model.quantize must be one of {QUANTIZERS}, got"
        f" {cfg.quantize!r}")
  factor = 2 ** (len(cfg.channel_mults) - 1)
  if cfg.resolution % factor:
    raise ValueError(
        f"config.model.resolution={cfg.resolution} is not divisible by the"
        f" downsample factor {factor} of channel_mults={cfg.channel_mults}")
  for width in [cfg.base_channels * m for m in cfg.channel_mults]:
    if width % cfg.norm_groups:
      raise ValueError(
          f"width {width} is not divisible by config.model.norm_groups="
          f"{cfg.norm_groups}")
  if not 0.0 <= cfg.nested_dropout_alpha <= 1.0:
    raise ValueError("config.model.nested_dropout_alpha must be in [0, 1],"
                     f" got {cfg.nested_dropout_alpha}")
  if cfg.quantize != "channel" and cfg.nested_dropout_alpha > 0:
    raise ValueError("nested channel dropout needs quantize='channel'; set"
                     " config.model.nested_dropout_alpha=0 for"
                     f" {cfg.quantize!r}")
  name = cfg.get("quantizer", "vq")
  if name not in ROW_QUANTIZERS:
    raise ValueError(f"config.model.quantizer must be one of"
                     f" {ROW_QUANTIZERS}, got {name!r}")
  if name != "vq" and cfg.quantize == "dynamic":
    raise ValueError(f"quantize='dynamic' needs quantizer='vq', got {name!r}")
  depth = cfg.get("rvq_depth", 1)
  if depth < 1:
    raise ValueError(f"config.model.rvq_depth must be >= 1, got {depth}")
  if depth > 1 and (name != "vq" or cfg.quantize == "dynamic"
                    or cfg.codebook.get("index_backprop", False)):
    raise ValueError(
        f"config.model.rvq_depth={depth} (residual VQ) needs a codebook"
        f" searched level by level: quantizer='vq' (got {name!r}), quantize"
        f" 'channel' or 'patch' (got {cfg.quantize!r}), no index_backprop")
  if cfg.codebook.get("kmeans_batches", 0) and (
      name != "vq" or cfg.quantize == "dynamic"):
    raise ValueError(
        "config.model.codebook.kmeans_batches > 0 starts a codebook from"
        f" k-means: quantizer='vq' (got {name!r}) along 'channel' or 'patch'"
        f" (got {cfg.quantize!r})")
  if implied_num_codes(cfg) != cfg.num_codes:
    raise ValueError(
        f"config.model.num_codes={cfg.num_codes} but quantizer={name!r} has"
        f" {implied_num_codes(cfg)} codes (its scalar settings): set"
        " num_codes to match")
  side = cfg.resolution // factor
  if cfg.quantize == "dynamic":
    levels = (cfg.get("dynamic") or {}).get("levels", 2)
    n = 2 ** (levels - 1) if levels in dynamic.LEVELS else 1
    if side % n:
      raise ValueError(f"quantize='dynamic' at {levels} levels needs a"
                       f" latent grid divisible by {n} ({n} x {n} cells a"
                       f" region), got {side}x{side}")


def num_tokens(cfg: ml_collections.ConfigDict) -> int:
  """Codes per image: C channel tokens, or h*w patch tokens (dynamic: at
  most h*w, the padded length; a coarse region takes 1 instead of 4),
  times rvq_depth (residual VQ: that many codes a token)."""
  if cfg.quantize == "channel":
    tokens = cfg.latent_channels
  else:
    tokens = (cfg.resolution // 2 ** (len(cfg.channel_mults) - 1)) ** 2
  return tokens * cfg.get("rvq_depth", 1)


def check_token_ids(tokens, num_codes: int, where: str) -> None:
  """Raises naming the value unless concrete token ids lie in 0..K-1.

  Traced ids are not checked (jnp.take would clamp them silently): the
  eager entry points (decode, embedding, shard readers) are where bad ids
  come in.
  """
  if isinstance(tokens, jax.core.Tracer) or not getattr(tokens, "size", 0):
    return
  if not jnp.issubdtype(tokens.dtype, jnp.integer):
    raise ValueError(f"{where}: token ids must be integers, got dtype"
                     f" {tokens.dtype}")
  lo, hi = int(jnp.min(tokens)), int(jnp.max(tokens))
  if lo < 0 or hi >= num_codes:
    bad = lo if lo < 0 else hi
    raise ValueError(f"{where}: token id {bad} is outside 0..{num_codes - 1}"
                     f" (K = {num_codes} codes)")


def check_images(images, resolution: int) -> None:
  """Shape, dtype and (for concrete arrays) range check of an image batch."""
  shape = getattr(images, "shape", None)
  if shape is None or len(shape) != 4 or tuple(shape[1:]) != (
      resolution, resolution, 3):
    raise ValueError(
        f"images must be [B, {resolution}, {resolution}, 3] in [-1, 1], got"
        f" shape {shape}")
  if not jnp.issubdtype(images.dtype, jnp.floating):
    raise ValueError(
        f"images must be floating point in [-1, 1], got dtype {images.dtype}")
  if not isinstance(images, jax.core.Tracer):
    lo, hi = float(jnp.min(images)), float(jnp.max(images))
    if lo < -1.01 or hi > 1.01:
      raise ValueError(
          f"images must lie in [-1, 1], got values in [{lo:.3g}, {hi:.3g}]"
          " (uint8 images need x / 127.5 - 1)")


def _row_quantizer(cfg: ml_collections.ConfigDict, dim: int,
                   rngs: nnx.Rngs, vq: dict | None = None):
  """The FSQ / LFQ / BSQ quantizer of rows of `dim` numbers, residual VQ
  over a codebook built from the VectorQuantizer keywords `vq`, or None
  for the codebook itself (built by the channel or patch quantizer)."""
  name, sc = cfg.get("quantizer", "vq"), cfg.get("scalar")
  if cfg.get("rvq_depth", 1) > 1:
    return residual.ResidualQuantizer(
        quantize.VectorQuantizer(cfg.num_codes, dim,
                                 **(vq or {"rngs": rngs})), cfg.rvq_depth)
  if name == "fsq":
    return scalar.FSQ(sc.fsq_levels, dim, rngs=rngs)
  if name in ("lfq", "bsq"):
    return scalar.LFQ(sc.bits, dim, spherical=name == "bsq",
                      entropy_weight=sc.entropy_weight,
                      diversity_gamma=sc.diversity_gamma,
                      temperature=sc.temperature, rngs=rngs)
  return None


class Tokenizer(nnx.Module):
  """Image <-> tokens. Channel-wise: T = C tokens; patch-wise: T = h*w."""

  def __init__(self, cfg: ml_collections.ConfigDict, *, rngs: nnx.Rngs):
    check_model_config(cfg)
    self.resolution = cfg.resolution
    self.num_tokens = num_tokens(cfg)
    self.quantize = cfg.quantize
    self.latent_channels = cfg.latent_channels
    self.num_codes = cfg.num_codes
    self.codes_per_token = cfg.get("rvq_depth", 1)  # residual VQ: depth
    self.nested_dropout_alpha = cfg.nested_dropout_alpha
    self.latent_size = cfg.resolution // 2 ** (len(cfg.channel_mults) - 1)
    net = dict(base_channels=cfg.base_channels,
               channel_mults=tuple(cfg.channel_mults),
               num_res_blocks=cfg.num_res_blocks,
               latent_channels=cfg.latent_channels,
               norm_groups=cfg.norm_groups, rngs=rngs)
    d = cfg.get("dynamic") or {}
    # Exports from before the dual-grain encoder pooled the fine cells.
    self.dual_grain = (cfg.quantize == "dynamic"
                       and d.get("encoder", "pooled") == "dual")
    if cfg.quantize == "dynamic" and d.get("encoder", "pooled") not in (
        "dual", "pooled"):
      raise ValueError("config.model.dynamic.encoder must be 'dual' or"
                       f" 'pooled', got {d.get('encoder')!r}")
    self.encoder = (vqgan.DualGrainEncoder(grains=d.get("levels", 2), **net)
                    if self.dual_grain else vqgan.Encoder(**net))
    self.decoder = vqgan.Decoder(**net)
    cb = cfg.codebook
    vq = dict(cosine=cb.cosine, simvq=cb.simvq, ema=cb.ema,
              ema_decay=cb.ema_decay, restart_fraction=cb.restart_fraction,
              init_scale=cb.init_scale, argmin_impl=cb.argmin_impl,
              rotation=cb.get("rotation", False),
              index_backprop=cb.get("index_backprop", False), rngs=rngs)
    s = self.latent_size
    row_dim = s * s if cfg.quantize == "channel" else cfg.latent_channels
    vq["rows"] = _row_quantizer(cfg, row_dim, rngs, dict(vq))
    if cfg.quantize == "channel":
      self.quantizer = quantize.ChannelQuantizer(cfg.num_codes, s, s, **vq)
    elif cfg.quantize == "dynamic":
      del vq["rows"]
      self.quantizer = dynamic.DynamicQuantizer(
          cfg.num_codes, cfg.latent_channels, s, s,
          fine_fraction=d.get("fine_fraction", 0.5),
          medium_fraction=d.get("medium_fraction", 0.0),
          levels=d.get("levels", 2),
          temperature=d.get("temperature", 1.0),
          # Exports from before the position embedding decode without one.
          position=d.get("position", "none"),
          calibration_decay=d.get("calibration_decay", 0.99),
          router=d.get("router", "learned"),
          pooled_coarse=not self.dual_grain, **vq)
    else:
      self.quantizer = quantize.PatchQuantizer(
          cfg.num_codes, cfg.latent_channels, **vq)

  def _channels_kept(self, batch: int, key: jax.Array) -> jax.Array:
    """Nested dropout: with prob alpha keep c ~ U{1..C} channels, else C."""
    apply_key, count_key = jax.random.split(key)
    alpha = self.nested_dropout_alpha
    apply_b = jax.random.uniform(apply_key, (batch,)) < alpha
    kept_b = jax.random.randint(count_key, (batch,), 1,
                                self.latent_channels + 1)
    return jnp.where(apply_b, kept_b, self.latent_channels).astype(jnp.int32)

  def __call__(self, images, *, train: bool = False,
               key: jax.Array | None = None) -> ForwardOutput:
    """Training/eval forward. Nested dropout and EMA updates only in train."""
    check_images(images, self.resolution)
    z_bhwc, coarse_bhwc = self._latents(images)
    b, c = images.shape[0], self.latent_channels
    channels_kept_b = jnp.full((b,), c, jnp.int32)
    keep_bc, vq_key = None, None
    if train:
      if key is None:
        raise ValueError("the training forward needs a PRNG key")
      drop_key, vq_key = jax.random.split(key)
      if self.nested_dropout_alpha > 0:
        channels_kept_b = self._channels_kept(b, drop_key)
        keep_bc = jnp.arange(c)[None, :] < channels_kept_b[:, None]
    zero = jnp.zeros((), jnp.float32)
    if self.quantize == "dynamic":
      dyn = self.quantizer(z_bhwc, train=train, key=vq_key, images=images,
                           coarse_bhwc=coarse_bhwc)
      out, indices = dyn.vq, dyn.tokens.codes
      index_weight = (dyn.tokens.positions
                      < self.quantizer.format.end).astype(jnp.float32)
      budget_loss, fine_share = dyn.budget_loss, jnp.mean(dyn.fine_gate)
      region_level = dyn.level
    else:
      out = self.quantizer(z_bhwc, keep_bc, train=train, key=vq_key)
      indices, budget_loss, fine_share = out.indices, zero, zero
      region_level = jnp.zeros((b, 0), jnp.int32)
      index_weight = jnp.ones(indices.shape, jnp.float32)
    quantized = out.quantized
    if keep_bc is not None:
      quantized = quantized * keep_bc[:, None, None, :].astype(quantized.dtype)
    features = self.decoder.features(quantized)
    return ForwardOutput(
        reconstructions=self.decoder.conv_out(features),
        decoder_features=features, indices=indices,
        codebook_loss=out.codebook_loss,
        commitment_loss=out.commitment_loss, code_counts=out.code_counts,
        channels_kept=channels_kept_b, latent_norm=out.input_norm,
        index_weight=index_weight, budget_loss=budget_loss,
        fine_share=fine_share, region_level=region_level)

  def encode(self, images: jax.Array):
    """[B, H, W, 3] in [-1, 1] -> tokens [B, T] int32 (dynamic: a
    DynamicTokens of padded codes, positions and lengths)."""
    check_images(images, self.resolution)
    if self.quantize == "dynamic":
      z_bhwc, coarse_bhwc = self._latents(images)
      return self.quantizer(z_bhwc, images=images,
                            coarse_bhwc=coarse_bhwc).tokens
    return self.quantizer(self.encoder(images)).indices

  def router_scores(self, images: jax.Array) -> jax.Array:
    """Dynamic quantization: the scores [B, R] the router's eval thresholds
    cut (DynamicQuantizer.scores)."""
    check_images(images, self.resolution)
    z = None
    if self.quantizer.router != "entropy":
      z = self._latents(images)[0]
    return jax.lax.stop_gradient(self.quantizer.scores(z, images))

  def calibrate(self, images: jax.Array) -> None:
    """Dynamic quantization: moves the eval thresholds toward the target
    quantiles of this batch's scores (a running mean); the trainer sets
    them exactly from several batches before each eval and checkpoint."""
    self.quantizer.calibrate(self.router_scores(images))

  def _latents(self, images):
    """(the latent [B, s, s, C], the dual-grain coarse one or None)."""
    z = self.encoder(images)
    return z if self.dual_grain else (z, None)

  def decode(self, tokens, levels: int | None = None) -> jax.Array:
    """Tokens [B, T] -> images [B, H, W, 3]. Channel tokens may be a prefix;
    dynamic tokens are a DynamicTokens (see encode). Residual VQ: T counts
    codes, a token's `codes_per_token` adjacent; `levels=d` decodes from
    each token's first d codes (coarser)."""
    if self.quantize == "dynamic":
      if not isinstance(tokens, dynamic.DynamicTokens):
        raise ValueError("a dynamic tokenizer decodes DynamicTokens(codes,"
                         " positions, lengths), as encode returns")
      check_token_ids(tokens.codes, self.num_codes, "Tokenizer.decode")
      return self.decoder(self.quantizer.lookup(tokens))
    if tokens.ndim != 2:
      raise ValueError(f"tokens must be [B, T], got shape {tokens.shape}")
    check_token_ids(tokens, self.num_codes, "Tokenizer.decode")
    if self.quantize == "channel":
      if not 1 <= tokens.shape[1] <= self.num_tokens:
        per = self.codes_per_token
        per = f" ({per} a channel)" if per > 1 else ""
        raise ValueError(
            f"channel tokens must number 1..{self.num_tokens}{per}, got"
            f" {tokens.shape[1]}")
      z = self.quantizer.lookup(tokens, self.latent_channels, levels)
    else:
      z = self.quantizer.lookup(tokens, self.latent_size, self.latent_size,
                                levels)
    return self.decoder(z)
