"""Quantizers: straight-through gradients, losses, EMA and restarts."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from cvqcar.tokenizer import quantize


def make_vq(**kwargs):
  return quantize.VectorQuantizer(32, 6, rngs=nnx.Rngs(0), **kwargs)


def test_output_is_nearest_codeword():
  vq = make_vq()
  x = jax.random.normal(jax.random.key(1), (40, 6))
  out = vq(x)
  codebook = np.asarray(vq.codebook())
  d = ((np.asarray(x)[:, None] - codebook[None]) ** 2).sum(-1)
  np.testing.assert_array_equal(out.indices, d.argmin(-1))
  np.testing.assert_allclose(out.quantized, codebook[d.argmin(-1)], atol=1e-6)


def test_straight_through_gradient_is_identity():
  vq = make_vq()
  x = jax.random.normal(jax.random.key(1), (40, 6))
  w = jax.random.normal(jax.random.key(2), (40, 6))
  grad = jax.grad(lambda x: jnp.sum(vq(x).quantized * w))(x)
  np.testing.assert_allclose(grad, w, rtol=1e-6)


def test_codebook_gets_gradient_from_codebook_loss():
  vq = make_vq()
  x = jax.random.normal(jax.random.key(1), (40, 6))
  graphdef, params = nnx.split(vq)

  def loss(params):
    return nnx.merge(graphdef, params)(x).codebook_loss

  grads = jax.grad(loss)(params)["codebook_kd"][...]
  out = vq(x)
  codebook = np.asarray(vq.codebook_kd[...])
  # d/de_k mean_n ||x_n - e_k||^2 / D = 2/(N D) sum_{n -> k} (e_k - x_n).
  want = np.zeros_like(codebook)
  for n, k in enumerate(np.asarray(out.indices)):
    want[k] += 2 * (codebook[k] - np.asarray(x[n])) / (40 * 6)
  np.testing.assert_allclose(grads, want, rtol=1e-4, atol=1e-7)
  # ... and the commitment loss sends nothing to the codebook.
  commit = jax.grad(lambda p: nnx.merge(graphdef, p)(x).commitment_loss)(
      params)["codebook_kd"][...]
  assert float(jnp.abs(commit).max()) == 0.0


def test_weights_drop_rows_from_losses():
  vq = make_vq()
  x = jax.random.normal(jax.random.key(1), (10, 6))
  keep = jnp.arange(10) < 4
  masked = vq(x.at[4:].set(1e3), keep)
  plain = vq(x[:4])
  np.testing.assert_allclose(masked.commitment_loss, plain.commitment_loss,
                             rtol=1e-6)
  np.testing.assert_allclose(masked.code_counts.sum(), 4)


def test_cosine_codes_are_unit_norm():
  vq = make_vq(cosine=True)
  out = vq(3.0 * jax.random.normal(jax.random.key(1), (20, 6)))
  np.testing.assert_allclose(jnp.linalg.norm(out.quantized, axis=-1), 1.0,
                             rtol=1e-5)


def test_simvq_trains_the_projection_not_the_basis():
  vq = make_vq(simvq=True)
  graphdef, params, rest = nnx.split(vq, nnx.Param, ...)
  x = jax.random.normal(jax.random.key(1), (20, 6))
  grads = jax.grad(lambda p: nnx.merge(graphdef, p, rest)(x).codebook_loss)(
      params)
  assert float(jnp.abs(grads["proj"]["kernel"][...]).max()) > 0
  assert "basis_kd" in rest and "basis_kd" not in params


def test_ema_moves_codewords_to_cluster_means_and_restarts_dead_codes():
  vq = make_vq(ema=True, ema_decay=0.5)
  # Two tight clusters: after warm-up the codebook holds data points only.
  centers = jnp.array([[5.0] * 6, [-5.0] * 6])
  x = centers[jnp.arange(64) % 2] + 0.01 * jax.random.normal(
      jax.random.key(3), (64, 6))
  for i in range(20):
    vq(x, train=True, key=jax.random.key(i))
  codebook = np.asarray(vq.codebook())
  nearest_center = np.abs(codebook[:, None] - np.asarray(centers)[None]
                          ).max(-1).min(-1)
  assert nearest_center.max() < 0.1, nearest_center  # no code left far away
  assert not any(isinstance(v, nnx.Param) for v in
                 jax.tree.leaves(nnx.state(vq), is_leaf=lambda v: isinstance(
                     v, nnx.Variable)))
  # Without restarts (threshold 0) the random init codes would stay put.
  stale = make_vq(ema=True, ema_decay=0.5, restart_fraction=0.0)
  for i in range(20):
    stale(x, train=True, key=jax.random.key(i))
  far = np.abs(np.asarray(stale.codebook())[:, None] - np.asarray(centers)[None]
               ).max(-1).min(-1)
  assert far.max() > 1.0


def test_ema_needs_key_in_training():
  with pytest.raises(ValueError, match="PRNG key"):
    make_vq(ema=True)(jnp.zeros((4, 6)), train=True)


def test_channel_and_patch_reshape_roundtrip():
  z = jax.random.normal(jax.random.key(0), (2, 4, 4, 3))
  cq = quantize.ChannelQuantizer(16, 4, 4, rngs=nnx.Rngs(0))
  out = cq(z)
  assert out.indices.shape == (2, 3) and out.quantized.shape == z.shape
  np.testing.assert_allclose(cq.lookup(out.indices, 3), out.quantized,
                             atol=1e-6)
  # Channel c of image b is codeword indices[b, c] laid out as a 4x4 map.
  code = np.asarray(cq.vq.codebook())[int(out.indices[1, 2])].reshape(4, 4)
  np.testing.assert_allclose(out.quantized[1, :, :, 2], code, atol=1e-6)
  pq = quantize.PatchQuantizer(16, 3, rngs=nnx.Rngs(0))
  out = pq(z)
  assert out.indices.shape == (2, 16)
  np.testing.assert_allclose(pq.lookup(out.indices, 4, 4), out.quantized,
                             atol=1e-6)
