"""K-means codebook init: Lloyd's iterations against NumPy from the same
start, every codebook variant set from centroids, and the trainer's fresh
state starting on the encoder's rows."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import tiny_config
from cvqcar.tokenizer import kmeans, quantize


def _numpy_lloyd(x, start, iters):
  c = x[start].copy()
  for _ in range(iters):
    codes = np.argmin(((x[:, None] - c[None]) ** 2).sum(-1), axis=1)
    for k in range(len(c)):
      if np.any(codes == k):
        c[k] = x[codes == k].mean(0)
  return c


def test_fit_matches_numpy_lloyd_from_the_same_start():
  rng = np.random.default_rng(0)
  centers = rng.normal(size=(6, 5)) * 4
  x = (centers[rng.integers(0, 6, 300)] + rng.normal(size=(300, 5))
       ).astype(np.float32)
  key = jax.random.key(3)
  start = np.asarray(jax.random.choice(key, 300, (12,), replace=False))
  fit = kmeans.fit(jnp.asarray(x), 12, key=key, iters=7)
  np.testing.assert_allclose(np.asarray(fit.centroids_kd),
                             _numpy_lloyd(x, start, 7), atol=1e-4)
  assert int(fit.counts_k.sum()) == 300
  one = kmeans.fit(jnp.asarray(x), 12, key=key, iters=1)
  assert float(fit.inertia) < float(one.inertia)


def test_cosine_and_residual_fits():
  x = jnp.asarray(np.random.default_rng(1).normal(size=(400, 8)),
                  jnp.float32)
  key = jax.random.key(0)
  sphere = kmeans.fit(x, 16, key=key, cosine=True)
  np.testing.assert_allclose(np.linalg.norm(sphere.centroids_kd, axis=1),
                             1.0, rtol=1e-5)
  res = kmeans.fit_residual(x, 30, 3, key=key)
  assert res.centroids_kd.shape == (30, 8)
  # Three levels of 10 codes quantize finer than one level of 10.
  flat = kmeans.fit(x, 10, key=jax.random.fold_in(key, 0))
  assert float(res.inertia) < float(flat.inertia)
  with pytest.raises(ValueError, match="needs rows"):
    kmeans.fit(x[:0], 4, key=key)


@pytest.mark.parametrize("variant", ["plain", "ema", "simvq", "cosine"])
def test_set_codebook_every_variant(variant):
  vq = quantize.VectorQuantizer(
      8, 4, ema=variant == "ema", simvq=variant == "simvq",
      cosine=variant == "cosine", rngs=nnx.Rngs(0))
  target = jnp.asarray(np.random.default_rng(2).normal(size=(8, 4)),
                       jnp.float32)
  counts = jnp.arange(1.0, 9.0)
  vq.set_codebook(target, counts)
  want = target / jnp.linalg.norm(target, axis=1, keepdims=True) if (
      variant == "cosine") else target
  np.testing.assert_allclose(np.asarray(vq.codebook()), np.asarray(want),
                             atol=1e-5)
  if variant == "ema":
    np.testing.assert_allclose(np.asarray(vq.ema_sum_kd[...]
                                          / counts[:, None]),
                               np.asarray(target), atol=1e-6)


def test_trainer_starts_the_codebook_on_the_encoders_rows():
  from cvqcar.data import images as image_data
  from cvqcar.tokenizer import trainer as tokenizer_trainer

  config = tiny_config()
  config.model.codebook.ema = False
  config.model.rvq_depth = 2  # the residual fit; plain k-means is above
  config.model.codebook.kmeans_batches = 2
  trainer = tokenizer_trainer.Trainer(config)
  fresh = trainer.init()
  batches = list(itertools.islice(image_data.train_dataset(config, 0), 2))
  images = jnp.asarray(batches[0]["image"])

  def commitment(state):
    model = nnx.merge(trainer.setup.gen_graphdef, state.params,
                      state.buffers)
    return float(model(images).commitment_loss)

  random_init = commitment(fresh)
  state = trainer.kmeans_init(jax.tree.map(jnp.copy, fresh), batches)
  assert commitment(state) < 0.5 * random_init
  leaf = lambda s: next(v for p, v in jax.tree_util.tree_leaves_with_path(s)
                        if "codebook_kd" in jax.tree_util.keystr(p))
  np.testing.assert_array_equal(np.asarray(leaf(state.ema_params)),
                                np.asarray(leaf(state.params)))
  assert not np.allclose(np.asarray(leaf(state.params)),
                         np.asarray(leaf(fresh.params)))
