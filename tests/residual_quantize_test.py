"""Residual VQ: codes, values and losses against vector-quantize-pytorch's
ResidualVQ with a shared codebook; levels refine coarse to fine."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch_references
from flax import nnx

from conftest import tiny_config
from cvqcar.tokenizer import model as model_lib
from cvqcar.tokenizer import quantize, residual


def _rvq(num_codes, dim, depth, **kwargs):
  vq = quantize.VectorQuantizer(num_codes, dim, rngs=nnx.Rngs(0), **kwargs)
  return residual.ResidualQuantizer(vq, depth)


def test_matches_vector_quantize_pytorch_shared_codebook():
  torch_references.torchvision()
  torch = pytest.importorskip("torch")
  vqp = pytest.importorskip("vector_quantize_pytorch")
  torch.manual_seed(0)
  ref = vqp.ResidualVQ(dim=16, num_quantizers=4, codebook_size=32,
                       shared_codebook=True, ema_update=False,
                       commitment_weight=1.0, rotation_trick=False)
  ref.train()
  x = torch.randn(3, 40, 16)
  want_q, want_idx, want_losses = ref(x)
  ours = _rvq(32, 16, 4, ema=False)
  ours.vq.codebook_kd[...] = jnp.asarray(
      ref.layers[0]._codebook.embed.detach().numpy()[0])
  out = ours(jnp.asarray(x.numpy().reshape(-1, 16)), train=True,
             key=jax.random.key(0))
  np.testing.assert_array_equal(np.asarray(out.indices),
                                want_idx.numpy().reshape(-1, 4))
  np.testing.assert_allclose(np.asarray(out.quantized),
                             want_q.detach().numpy().reshape(-1, 16),
                             atol=1e-5)
  # Ours: the mean over levels of each level's commitment (theirs per level).
  want_losses = want_losses.detach()
  np.testing.assert_allclose(float(out.commitment_loss),
                             float(want_losses.mean()), rtol=1e-5)
  assert float(want_losses[-1]) < float(want_losses[0])  # residuals shrink


def test_levels_refine_and_the_gradient_is_straight_through():
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(256, 8)), jnp.float32)
  rvq = _rvq(64, 8, 4, ema=False)
  # A codebook at the data's scale and below: each level can only help.
  rvq.vq.codebook_kd[...] = jnp.asarray(
      rng.normal(size=(64, 8)) * np.repeat([1.0, 0.5, 0.25, 0.12], 16)[:, None],
      jnp.float32)
  out = rvq(x)
  assert out.indices.shape == (256, 4)
  codes = out.indices.reshape(1, -1)  # a token's levels adjacent
  errors = [float(jnp.mean(jnp.square(
      rvq.lookup(codes, levels=d)[0] - x))) for d in range(1, 5)]
  assert all(a > b for a, b in zip(errors, errors[1:], strict=False)), errors
  np.testing.assert_allclose(np.asarray(rvq.lookup(codes)[0]),
                             np.asarray(out.quantized), atol=1e-5)
  # A prefix of codes cut inside a token decodes its first levels only.
  cut = rvq.lookup(codes[:, :6])[0]
  np.testing.assert_allclose(np.asarray(cut[1]), np.asarray(
      rvq.lookup(codes[:, 4:6])[0, 0]), atol=1e-6)
  g = jax.grad(lambda x: jnp.sum(rvq(x).quantized * 3.0))(x)
  np.testing.assert_allclose(np.asarray(g), 3.0)  # identity, not depth x


def test_ema_codebook_updates_once_from_every_level():
  rvq = _rvq(16, 4, 3, ema=True, restart_fraction=0.0)
  x = jnp.asarray(np.random.default_rng(1).normal(size=(64, 4)), jnp.float32)
  before = np.asarray(rvq.vq.ema_count_k[...]).sum()
  rvq(x, train=True, key=jax.random.key(0))
  added = np.asarray(rvq.vq.ema_count_k[...]).sum() - before
  np.testing.assert_allclose(added, (1 - 0.99) * 64 * 3, rtol=1e-5)


def test_tokenizer_decodes_fewer_levels_and_rejects_misuse():
  config = tiny_config()
  config.model.rvq_depth = 3
  model = model_lib.Tokenizer(config.model, rngs=nnx.Rngs(0))
  images = jnp.asarray(np.random.default_rng(0).uniform(
      -1, 1, (2, 16, 16, 3)), jnp.float32)
  tokens = model.encode(images)
  assert tokens.shape == (2, 8 * 3) and model.num_tokens == 24
  coarse = model.decode(tokens, levels=1)
  assert float(jnp.max(jnp.abs(coarse - model.decode(tokens)))) > 0
  # The first k channels are the first 3k codes.
  np.testing.assert_allclose(
      np.asarray(model.decode(tokens[:, :6])),
      np.asarray(model.decoder(model.quantizer.lookup(tokens[:, :6], 8))),
      atol=1e-6)
  with pytest.raises(ValueError, match=r"1\.\.24 \(3 a channel\)"):
    model.decode(jnp.zeros((2, 25), jnp.int32))
  with pytest.raises(ValueError, match="levels must be in 1..3"):
    model.decode(tokens, levels=4)
  for field, value in (("quantizer", "fsq"), ("quantize", "dynamic")):
    bad = tiny_config()
    bad.model.rvq_depth = 2
    bad.model[field] = value
    bad.model.nested_dropout_alpha = 0.0
    with pytest.raises(ValueError, match="rvq_depth=2"):
      model_lib.check_model_config(bad.model)
