"""VQGAN-style convolutional encoder, decoder and PatchGAN discriminator."""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from cvqcar import sharding


def _conv(cin, cout, rngs, kernel=3, stride=1, padding="SAME"):
  return nnx.Conv(
      cin, cout, (kernel, kernel), strides=(stride, stride), padding=padding,
      kernel_init=sharding.axes(nnx.initializers.lecun_normal(), None, None,
                                "conv_in", "conv_out"),
      bias_init=sharding.axes(nnx.initializers.zeros_init(), "conv_out"),
      rngs=rngs)


def _norm(ch, groups, rngs):
  return nnx.GroupNorm(
      ch, num_groups=groups, rngs=rngs,
      scale_init=sharding.axes(nnx.initializers.ones_init(), "norm"),
      bias_init=sharding.axes(nnx.initializers.zeros_init(), "norm"))


class ResBlock(nnx.Module):
  """GroupNorm -> swish -> conv, twice, with a 1x1 skip when widths differ."""

  def __init__(self, cin: int, cout: int, groups: int, *, rngs: nnx.Rngs):
    self.norm1 = _norm(cin, groups, rngs)
    self.conv1 = _conv(cin, cout, rngs)
    self.norm2 = _norm(cout, groups, rngs)
    self.conv2 = _conv(cout, cout, rngs)
    self.skip = _conv(cin, cout, rngs, kernel=1) if cin != cout else None

  def __call__(self, x):
    h = self.conv1(nnx.swish(self.norm1(x)))
    h = self.conv2(nnx.swish(self.norm2(h)))
    return h + (x if self.skip is None else self.skip(x))


class Downsample(nnx.Module):
  """Stride-2 3x3 conv, padded on the bottom/right as in VQGAN."""

  def __init__(self, ch: int, *, rngs: nnx.Rngs):
    self.conv = _conv(ch, ch, rngs, stride=2, padding=((0, 1), (0, 1)))

  def __call__(self, x):
    return self.conv(x)


class Upsample(nnx.Module):
  """Nearest-neighbour x2 followed by a 3x3 conv."""

  def __init__(self, ch: int, *, rngs: nnx.Rngs):
    self.conv = _conv(ch, ch, rngs)

  def __call__(self, x):
    b, h, w, c = x.shape
    x = jax.image.resize(x, (b, 2 * h, 2 * w, c), method="nearest")
    return self.conv(x)


def _widths(base: int, mults: Sequence[int]) -> list[int]:
  return [base * m for m in mults]


class Encoder(nnx.Module):
  """[B, H, W, 3] -> [B, H/f, W/f, latent_channels], f = 2**(levels - 1)."""

  def __init__(self, *, base_channels: int, channel_mults: Sequence[int],
               num_res_blocks: int, latent_channels: int, norm_groups: int,
               rngs: nnx.Rngs):
    widths = _widths(base_channels, channel_mults)
    self.conv_in = _conv(3, widths[0], rngs)
    blocks, cin = [], widths[0]
    for level, cout in enumerate(widths):
      for _ in range(num_res_blocks):
        blocks.append(ResBlock(cin, cout, norm_groups, rngs=rngs))
        cin = cout
      if level < len(widths) - 1:
        blocks.append(Downsample(cin, rngs=rngs))
    blocks += [ResBlock(cin, cin, norm_groups, rngs=rngs) for _ in range(2)]
    self.blocks = nnx.List(blocks)
    self.norm_out = _norm(cin, norm_groups, rngs)
    self.conv_out = _conv(cin, latent_channels, rngs)

  def __call__(self, x):
    h = self.conv_in(x)
    for block in self.blocks:
      h = block(h)
    return self.conv_out(nnx.swish(self.norm_out(h)))


class AttnBlock(nnx.Module):
  """Single-head self-attention over the positions of a [B, h, w, C] map
  (GroupNorm, 1x1 q/k/v, softmax(q.k / sqrt C), 1x1 out), residual."""

  def __init__(self, ch: int, groups: int, *, rngs: nnx.Rngs):
    self.norm = _norm(ch, groups, rngs)
    self.q, self.k, self.v, self.out = (
        _conv(ch, ch, rngs, kernel=1) for _ in range(4))

  def __call__(self, x):
    b, h, w, c = x.shape
    y = self.norm(x)
    q, k, v = (f(y).reshape(b, h * w, c) for f in (self.q, self.k, self.v))
    weights = jax.nn.softmax(jnp.einsum("bqc,bkc->bqk", q, k) / c ** 0.5,
                             axis=-1)
    attended = jnp.einsum("bqk,bkc->bqc", weights, v).reshape(b, h, w, c)
    return x + self.out(attended)


class _Head(nnx.Module):
  """Mid block (ResBlock, attention, ResBlock), norm, swish, conv out."""

  def __init__(self, ch: int, latent_channels: int, groups: int, *,
               rngs: nnx.Rngs):
    self.block1 = ResBlock(ch, ch, groups, rngs=rngs)
    self.attn = AttnBlock(ch, groups, rngs=rngs)
    self.block2 = ResBlock(ch, ch, groups, rngs=rngs)
    self.norm_out = _norm(ch, groups, rngs)
    self.conv_out = _conv(ch, latent_channels, rngs)

  def __call__(self, h):
    h = self.block2(self.attn(self.block1(h)))
    return self.conv_out(nnx.swish(self.norm_out(h)))


class DualGrainEncoder(nnx.Module):
  """[B, H, W, 3] -> (fine [B, H/f, W/f, C], coarse [B, H/2f, W/2f, C]);
  with grains=3, (fine, (coarse [B, H/4f, W/4f, C], medium [B, H/2f, ...])).

  DQ-VAE's dual-grain (and triple-grain) encoder: the Encoder's levels and
  one more downsampling per extra grain (at the last level's width); the
  fine grain is read after the level at H/f, each coarser one after its
  extra level, each through its own head (mid ResBlock, attention,
  ResBlock, norm, conv), so a coarse code sees a wider field through
  non-linear layers, not a pooling of the four finer cells.
  """

  def __init__(self, *, base_channels: int, channel_mults: Sequence[int],
               num_res_blocks: int, latent_channels: int, norm_groups: int,
               grains: int = 2, rngs: nnx.Rngs):
    if grains not in (2, 3):
      raise ValueError(f"DualGrainEncoder has 2 or 3 grains, got {grains}")
    self.grains = grains
    widths = _widths(base_channels, tuple(channel_mults)
                     + (channel_mults[-1],) * (grains - 1))
    self.conv_in = _conv(3, widths[0], rngs)
    levels, downs, cin = [], [], widths[0]
    for cout in widths:
      blocks = []
      for _ in range(num_res_blocks):
        blocks.append(ResBlock(cin, cout, norm_groups, rngs=rngs))
        cin = cout
      levels.append(nnx.List(blocks))
      downs.append(Downsample(cin, rngs=rngs))
    self.levels = nnx.List(levels)
    self.downs = nnx.List(downs[:-1])  # none after the coarsest level
    head = lambda width: _Head(width, latent_channels, norm_groups, rngs=rngs)
    self.fine_head = head(widths[-grains])
    if grains == 3:
      self.medium_head = head(widths[-2])
    self.coarse_head = head(widths[-1])

  def __call__(self, x):
    h, outs = self.conv_in(x), {}
    first = len(self.levels) - self.grains
    for i, blocks in enumerate(self.levels):
      for block in blocks:
        h = block(h)
      if i >= first:
        outs[i - first] = h  # 0: fine, then coarser
      if i < len(self.downs):
        h = self.downs[i](h)
    fine, coarse = self.fine_head(outs[0]), self.coarse_head(h)
    if self.grains == 2:
      return fine, coarse
    return fine, (coarse, self.medium_head(outs[1]))


class Decoder(nnx.Module):
  """[B, h, w, latent_channels] -> [B, h*f, w*f, 3]; mirror of the encoder."""

  def __init__(self, *, base_channels: int, channel_mults: Sequence[int],
               num_res_blocks: int, latent_channels: int, norm_groups: int,
               rngs: nnx.Rngs):
    widths = _widths(base_channels, channel_mults)[::-1]
    cin = widths[0]
    self.conv_in = _conv(latent_channels, cin, rngs)
    blocks = [ResBlock(cin, cin, norm_groups, rngs=rngs) for _ in range(2)]
    for level, cout in enumerate(widths):
      for _ in range(num_res_blocks):
        blocks.append(ResBlock(cin, cout, norm_groups, rngs=rngs))
        cin = cout
      if level < len(widths) - 1:
        blocks.append(Upsample(cin, rngs=rngs))
    self.blocks = nnx.List(blocks)
    self.norm_out = _norm(cin, norm_groups, rngs)
    self.conv_out = _conv(cin, 3, rngs)

  def features(self, z):
    """All but the last conv (whose weight sets the adaptive GAN weight)."""
    h = self.conv_in(z)
    for block in self.blocks:
      h = block(h)
    return nnx.swish(self.norm_out(h))

  def __call__(self, z):
    return self.conv_out(self.features(z))


class PatchDiscriminator(nnx.Module):
  """PatchGAN: a grid of real/fake logits, one per receptive-field patch."""

  def __init__(self, *, base_channels: int = 64, num_layers: int = 3,
               norm_groups: int = 32, rngs: nnx.Rngs):
    self.conv_in = _conv(3, base_channels, rngs, kernel=4, stride=2)
    convs, norms, cin = [], [], base_channels
    for n in range(1, num_layers + 1):
      cout = base_channels * min(2**n, 8)
      stride = 2 if n < num_layers else 1
      convs.append(_conv(cin, cout, rngs, kernel=4, stride=stride))
      norms.append(_norm(cout, min(norm_groups, cout), rngs))
      cin = cout
    self.convs = nnx.List(convs)
    self.norms = nnx.List(norms)
    self.head = _conv(cin, 1, rngs, kernel=4)

  def __call__(self, x):
    h = nnx.leaky_relu(self.conv_in(x), 0.2)
    for conv, norm in zip(self.convs, self.norms, strict=True):
      h = nnx.leaky_relu(norm(conv(h)), 0.2)
    return self.head(h)[..., 0]  # [B, H', W'] logits
