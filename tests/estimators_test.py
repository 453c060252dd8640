"""Gradient estimators of codebook quantizers: the rotation trick against
vector-quantize-pytorch's, and IBQ's index backpropagation against its
formula in PyTorch (every codeword gets gradient)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch_references
from flax import nnx

from cvqcar.tokenizer import quantize


def _torch():
  torch_references.torchvision()
  return pytest.importorskip("torch")


def test_rotation_trick_matches_vector_quantize_pytorch():
  torch = _torch()
  vqp = pytest.importorskip("vector_quantize_pytorch.vector_quantize_pytorch")
  rng = np.random.default_rng(0)
  z, e, g = (rng.normal(size=(32, 16)).astype(np.float32) for _ in range(3))
  zt = torch.tensor(z, requires_grad=True)
  want = vqp.rotate_to(zt, torch.tensor(e))
  (want * torch.tensor(g)).sum().backward()
  ours = quantize.rotate_to(jnp.asarray(z), jnp.asarray(e))
  np.testing.assert_allclose(np.asarray(ours), want.detach().numpy(),
                             atol=1e-5)
  np.testing.assert_allclose(np.asarray(ours), e, atol=1e-5)  # value e
  grad = jax.grad(lambda z: jnp.sum(quantize.rotate_to(z, jnp.asarray(e)) *
                                    g))(jnp.asarray(z))
  np.testing.assert_allclose(np.asarray(grad), zt.grad.numpy(), atol=1e-5)
  # Not the straight-through gradient (which would be g itself).
  assert np.abs(np.asarray(grad) - g).max() > 0.1


def test_rotation_quantizer_forward_is_the_codeword():
  vq = quantize.VectorQuantizer(32, 8, rotation=True, rngs=nnx.Rngs(0))
  x = jnp.asarray(np.random.default_rng(0).normal(size=(20, 8)), jnp.float32)
  out = vq(x)
  np.testing.assert_array_equal(np.asarray(out.quantized),
                                np.asarray(vq.lookup(out.indices)))
  g = jnp.asarray(np.random.default_rng(1).normal(size=(20, 8)), jnp.float32)
  grad = jax.grad(lambda x: jnp.sum(vq(x).quantized * g))(x)
  want = jax.grad(lambda x: jnp.sum(quantize.rotate_to(
      x, vq.lookup(out.indices)) * g))(x)
  np.testing.assert_allclose(np.asarray(grad), np.asarray(want), atol=1e-6)


def _ibq_reference(torch, z, codebook, beta):
  """The IBQ quantizer's forward and double quantization loss, as the
  authors' PyTorch computes them (rows instead of [b, d, h, w])."""
  logits = z @ codebook.T
  soft = torch.softmax(logits, dim=1)
  ind = soft.max(1, keepdim=True)[1]
  hard = torch.zeros_like(logits).scatter_(1, ind, 1.0)
  one_hot = hard - soft.detach() + soft
  z_q, z_q_2 = one_hot @ codebook, hard @ codebook
  loss = (torch.mean((z_q - z) ** 2) + torch.mean((z_q_2.detach() - z) ** 2)
          + beta * torch.mean((z_q_2 - z.detach()) ** 2))
  return z_q, ind[:, 0], loss


def test_ibq_matches_its_formula_and_every_code_gets_gradient():
  torch = _torch()
  rng = np.random.default_rng(0)
  z = rng.normal(size=(24, 8)).astype(np.float32)
  g = rng.normal(size=(24, 8)).astype(np.float32)
  vq = quantize.VectorQuantizer(16, 8, index_backprop=True, init_scale=0.5,
                                rngs=nnx.Rngs(0))
  codebook = np.asarray(vq.codebook_kd[...])
  beta = 0.25
  zt = torch.tensor(z, requires_grad=True)
  ct = torch.tensor(codebook, requires_grad=True)
  z_q, ind, loss = _ibq_reference(torch, zt, ct, beta)
  ((z_q * torch.tensor(g)).sum() + loss).backward()

  def objective(params, z):
    vq_ = nnx.merge(graphdef, params)
    out = vq_(z, train=True)
    total = (jnp.sum(out.quantized * g) + out.codebook_loss +
             beta * out.commitment_loss)
    return total, out

  graphdef, params = nnx.split(vq)
  (_, out), (grad_params, grad_z) = jax.value_and_grad(
      objective, argnums=(0, 1), has_aux=True)(params, jnp.asarray(z))
  np.testing.assert_array_equal(np.asarray(out.indices), ind.numpy())
  np.testing.assert_array_equal(np.asarray(out.quantized),
                                codebook[np.asarray(out.indices)])
  np.testing.assert_allclose(
      float(out.codebook_loss + beta * out.commitment_loss),
      float(loss.detach()), rtol=1e-5)
  np.testing.assert_allclose(np.asarray(grad_z), zt.grad.numpy(), atol=1e-5)
  grad_codebook = np.asarray(grad_params["codebook_kd"][...])
  np.testing.assert_allclose(grad_codebook, ct.grad.numpy(), atol=1e-5)
  # Index backpropagation: every codeword gets gradient, used or not.
  used = set(np.asarray(out.indices).tolist())
  assert len(used) < 16
  assert np.all(np.abs(grad_codebook).sum(axis=1) > 1e-6)


def test_ibq_refuses_ema_and_rotation():
  for kwargs in ({"ema": True}, {"rotation": True}):
    with pytest.raises(ValueError, match="index_backprop"):
      quantize.VectorQuantizer(8, 4, index_backprop=True, rngs=nnx.Rngs(0),
                               **kwargs)
