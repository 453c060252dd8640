"""Reconstruction and codebook metrics: PSNR, SSIM, usage, perplexity.

Every metric computes in float32 and every convolution asks for
`Precision.HIGHEST`: TPUs run default-precision float32 convolutions as one
bf16 pass and recent NVIDIA GPUs as TF32, and SSIM's variance terms
(blur(x^2) - blur(x)^2) cancel: with a bf16 window (which no longer sums to
1) a blurred photo scores hundredths too high. Histograms and perplexity
are host-side float64.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

_HIGHEST = jax.lax.Precision.HIGHEST


def _to_unit(x):
  return jnp.clip((x.astype(jnp.float32) + 1.0) / 2.0, 0.0, 1.0)


def psnr(x, y) -> jax.Array:
  """Per-image PSNR in dB of images in [-1, 1] (peak 1 after mapping to
  [0, 1]), [B, H, W, 3] -> [B]."""
  mse = jnp.mean(jnp.square(_to_unit(x) - _to_unit(y)), axis=(1, 2, 3))
  return -10.0 * jnp.log10(jnp.maximum(mse, 1e-10))


def _gaussian_window(size: int = 11, sigma: float = 1.5) -> np.ndarray:
  r = np.arange(size, dtype=np.float32) - (size - 1) / 2
  g = np.exp(-(r**2) / (2 * sigma**2))
  return (g / g.sum()).astype(np.float32)


def _blur(x_bhwc, window):
  """Separable valid-mode Gaussian filter, per channel, at full float32
  precision (see the module docstring)."""
  c = x_bhwc.shape[-1]
  k = window.shape[0]
  kx = jnp.tile(jnp.asarray(window).reshape(1, k, 1, 1), (1, 1, 1, c))
  ky = jnp.tile(jnp.asarray(window).reshape(k, 1, 1, 1), (1, 1, 1, c))
  dims = ("NHWC", "HWIO", "NHWC")
  for kernel in (kx, ky):
    x_bhwc = jax.lax.conv_general_dilated(
        x_bhwc, kernel, (1, 1), "VALID", dimension_numbers=dims,
        feature_group_count=c, precision=_HIGHEST)
  return x_bhwc


def ssim(x, y, *, window_size: int = 11, sigma: float = 1.5) -> jax.Array:
  """Per-image SSIM (Wang et al. 2004, Gaussian window) of images in [-1, 1]."""
  x, y = _to_unit(x), _to_unit(y)
  size = min(window_size, x.shape[1], x.shape[2])
  window = _gaussian_window(size, sigma)
  c1, c2 = 0.01**2, 0.03**2
  mu_x, mu_y = _blur(x, window), _blur(y, window)
  sxx = _blur(x * x, window) - mu_x**2
  syy = _blur(y * y, window) - mu_y**2
  sxy = _blur(x * y, window) - mu_x * mu_y
  ssim_map = ((2 * mu_x * mu_y + c1) * (2 * sxy + c2)) / (
      (mu_x**2 + mu_y**2 + c1) * (sxx + syy + c2))
  return jnp.mean(ssim_map, axis=(1, 2, 3))


def codebook_usage(code_counts_k) -> float:
  """Fraction of codes hit at least once."""
  counts = np.asarray(code_counts_k)
  return float(np.mean(counts > 0))


def codebook_perplexity(code_counts_k) -> float:
  """exp(entropy) of the code histogram: K when all codes are equally used."""
  counts = np.asarray(code_counts_k, np.float64)
  p = counts / max(counts.sum(), 1e-12)
  nz = p[p > 0]
  return float(np.exp(-np.sum(nz * np.log(nz))))


def prefix_lengths(num_channels: int) -> list[int]:
  """k = C/64, C/32, ..., C/2, C (at least 1, no repeats)."""
  ks = [max(1, num_channels // d) for d in (64, 32, 16, 8, 4, 2, 1)]
  return sorted(set(ks))
