"""The splash attention path (Pallas TPU kernel, interpreted here) against
the einsum reference: forward and gradients, GQA, padding, meshes."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from cvqcar import sharding
from cvqcar.car import qwen3
from cvqcar.kernels import attention_tpu


def _inputs(b=2, t=150, h=4, kv=2, d=128, pads=(0, 7)):
  rng = np.random.default_rng(0)
  q = jnp.asarray(rng.normal(size=(b, t, h, d)), jnp.float32)
  k = jnp.asarray(rng.normal(size=(b, t, kv, d)), jnp.float32)
  v = jnp.asarray(rng.normal(size=(b, t, kv, d)), jnp.float32)
  valid = jnp.arange(t)[None] >= jnp.asarray(pads)[:, None]
  return q, k, v, valid


def _splash(q, k, v, valid):
  return attention_tpu.causal_attention(q, k, v, valid, interpret=True)


def _plain(q, k, v, valid):
  return qwen3.attention(q, k, v, valid[:, None, None], True, "plain")


def test_splash_equals_the_reference_forward_and_gradient():
  q, k, v, valid = _inputs()
  want = _plain(q, k, v, valid)
  got = _splash(q, k, v, valid)
  real = np.asarray(valid)[..., None, None]
  assert np.abs(np.where(real, want, 0)).max() > 0.5
  np.testing.assert_allclose(np.where(real, got, 0), np.where(real, want, 0),
                             atol=1e-5)

  def loss(fn):
    # Padding rows' outputs are never read; compare what real rows see.
    return lambda q, k, v: jnp.sum(jnp.where(real, fn(q, k, v, valid),
                                             0) ** 2)

  grads = jax.grad(loss(_splash), (0, 1, 2))(q, k, v)
  wants = jax.grad(loss(_plain), (0, 1, 2))(q, k, v)
  for g, w in zip(grads, wants, strict=True):
    assert float(jnp.abs(w).max()) > 1.0
    np.testing.assert_allclose(g, w, atol=1e-4, rtol=1e-4)


def test_splash_backbone_on_a_mesh_equals_the_reference():
  config = dataclasses.replace(qwen3.PRESETS["tiny"], attention="plain")
  ref = qwen3.Qwen3(config, rngs=nnx.Rngs(0))
  splash = nnx.merge(nnx.graphdef(qwen3.Qwen3(dataclasses.replace(
      config, attention="splash"), rngs=nnx.Rngs(1))), nnx.state(ref))
  ids = jnp.asarray(np.random.default_rng(1).integers(0, 512, (4, 20)))
  mask = jnp.arange(20)[None] >= jnp.asarray([0, 3, 0, 9])[:, None]
  positions = jnp.maximum(jnp.cumsum(mask, 1) - 1, 0)
  real = np.asarray(mask)[..., None]

  def loss(model):
    logits = model(ids, positions=positions, attention_mask=mask)
    return jnp.sum(jnp.where(real, jax.nn.log_softmax(logits), 0)[..., 0])

  cfg = ml_config(fsdp=2, model=2, data=2)
  mesh = sharding.make_mesh(cfg)
  with jax.set_mesh(mesh):
    got, grads = jax.jit(nnx.value_and_grad(loss))(splash)
  want, wants = jax.jit(nnx.value_and_grad(loss))(ref)
  np.testing.assert_allclose(got, want, rtol=1e-5)
  for g, w in zip(jax.tree.leaves(grads), jax.tree.leaves(wants),
                  strict=True):
    np.testing.assert_allclose(g, w, atol=1e-5, rtol=1e-4)


def ml_config(**mesh):
  import ml_collections

  return ml_collections.ConfigDict({"mesh": mesh, "batch_size": 4})


@pytest.mark.parametrize("t", [1, 128, 129])
def test_splash_handles_any_length(t):
  q, k, v, valid = _inputs(b=1, t=t, h=2, kv=1, d=128, pads=(0,))
  np.testing.assert_allclose(_splash(q, k, v, valid), _plain(q, k, v, valid),
                             atol=1e-5)
