"""PSNR, SSIM and codebook statistics against closed forms."""

import jax
import jax.numpy as jnp
import numpy as np

from cvqcar import metrics


def test_psnr_closed_form():
  x = jnp.zeros((2, 8, 8, 3))
  y = x + 0.2  # 0.1 in [0, 1] units -> MSE 0.01 -> 20 dB
  np.testing.assert_allclose(metrics.psnr(x, y), [20.0, 20.0], rtol=1e-5)
  assert float(metrics.psnr(x, x)[0]) >= 99.0


def test_ssim_identity_and_monotone_in_noise():
  x = jax.random.uniform(jax.random.key(0), (2, 24, 24, 3), minval=-1.0)
  np.testing.assert_allclose(metrics.ssim(x, x), 1.0, rtol=1e-5)
  noise = jax.random.normal(jax.random.key(1), x.shape)
  small = metrics.ssim(x, jnp.clip(x + 0.05 * noise, -1, 1))
  large = metrics.ssim(x, jnp.clip(x + 0.5 * noise, -1, 1))
  assert np.all(np.asarray(large) < np.asarray(small))
  assert np.all(np.asarray(small) < 1.0)


def test_ssim_matches_direct_formula_on_constant_images():
  # Constant images: variances vanish, SSIM = (2ab + c1) / (a^2 + b^2 + c1).
  a, b = 0.25, 0.75
  x = jnp.full((1, 16, 16, 3), 2 * a - 1)
  y = jnp.full((1, 16, 16, 3), 2 * b - 1)
  c1 = 0.01**2
  want = (2 * a * b + c1) / (a * a + b * b + c1)
  np.testing.assert_allclose(metrics.ssim(x, y), [want], rtol=5e-4)


def test_usage_and_perplexity():
  assert metrics.codebook_usage([0, 3, 0, 1]) == 0.5
  np.testing.assert_allclose(metrics.codebook_perplexity([5, 5, 5, 5]), 4.0)
  np.testing.assert_allclose(metrics.codebook_perplexity([7, 0, 0, 0]), 1.0)


def test_prefix_lengths():
  assert metrics.prefix_lengths(256) == [4, 8, 16, 32, 64, 128, 256]
  assert metrics.prefix_lengths(8) == [1, 2, 4, 8]
