"""Metrics read the same on every accelerator: each convolution and matmul
of the metric code asks for Precision.HIGHEST, each reduction runs in
float32, and a TPU-like bf16 rounding of default-precision operands leaves
the scores unchanged."""

import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch_references
from flax import nnx
from jax.extend import core as jex_core

from cvqcar import metrics
from cvqcar.evaluation import fid, generative, inception
from cvqcar.tokenizer import evaluate, lpips

HIGHEST = jax.lax.Precision.HIGHEST
_MATMULS = ("conv_general_dilated", "dot_general")


def _pinned(params) -> bool:
  p = params.get("precision")
  p = p if isinstance(p, tuple) else (p,)
  return all(q == HIGHEST for q in p)


def _subjaxprs(params):
  for v in params.values():
    if isinstance(v, jex_core.ClosedJaxpr):
      yield v.jaxpr
    elif isinstance(v, jex_core.Jaxpr):
      yield v
    elif isinstance(v, tuple):
      yield from _subjaxprs(dict(enumerate(v)))


def _eqns(jaxpr):
  """Every equation, nested jaxprs (jit, custom_jvp, ...) included."""
  for eqn in jaxpr.eqns:
    yield eqn
    for sub in _subjaxprs(eqn.params):
      yield from _eqns(sub)


def _fresh(fn):
  # jit and make_jaxpr cache traces by function: a new one retraces, so a
  # monkeypatched op is seen.
  return lambda *args: fn(*args)


def stablehlo_matmuls(fn, *args) -> list[str]:
  """The convolution and dot_general lines of fn's lowered program."""
  text = jax.jit(_fresh(fn)).lower(*args).as_text()
  return [line.strip() for line in text.splitlines()
          if "stablehlo.convolution" in line or
          "stablehlo.dot_general" in line]


def check_pinned(fn, *args) -> None:
  """Fails naming the op if fn would run any conv/matmul at a precision
  other than HIGHEST, or any conv, matmul or reduction off float32."""
  lines = stablehlo_matmuls(fn, *args)
  assert lines, "no convolution or matmul lowered: nothing checked"
  for line in lines:
    assert line.count("HIGHEST") == 2, line[:300]
  for eqn in _eqns(jax.make_jaxpr(_fresh(fn))(*args).jaxpr):
    name = eqn.primitive.name
    if name in _MATMULS:
      assert _pinned(eqn.params), (name, eqn.params.get("precision"))
    if name in _MATMULS or name.startswith(("reduce_", "cum")):
      for v in eqn.invars:
        dtype = v.aval.dtype
        assert not jnp.issubdtype(dtype, jnp.floating) or (
            dtype == jnp.float32), (name, dtype)


def _round_bf16(x):
  if jnp.issubdtype(x.dtype, jnp.floating):
    return x.astype(jnp.bfloat16).astype(x.dtype)
  return x


def _eval(jaxpr, consts, args):
  env = {}

  def read(v):
    return v.val if isinstance(v, jex_core.Literal) else env[v]

  for var, val in zip(jaxpr.constvars, consts, strict=True):
    env[var] = val
  for var, val in zip(jaxpr.invars, args, strict=True):
    env[var] = val
  for eqn in jaxpr.eqns:
    invals = [read(v) for v in eqn.invars]
    name = eqn.primitive.name
    if name in _MATMULS and not _pinned(eqn.params):
      invals = [_round_bf16(x) for x in invals[:2]] + invals[2:]
    if name in ("pjit", "jit"):
      sub = eqn.params["jaxpr"]
      outvals = _eval(sub.jaxpr, sub.consts, invals)
    elif name == "custom_jvp_call":
      sub = eqn.params["call_jaxpr"]
      outvals = _eval(sub.jaxpr, sub.consts, invals)
    elif list(_subjaxprs(eqn.params)):
      raise NotImplementedError(f"bf16 emulation of {name}")
    else:
      outvals = eqn.primitive.bind(*invals, **eqn.params)
      if not eqn.primitive.multiple_results:
        outvals = [outvals]
    for var, val in zip(eqn.outvars, outvals, strict=True):
      env[var] = val
  return [read(v) for v in jaxpr.outvars]


def tpu_default(fn):
  """fn as a TPU runs it: the operands of every conv/matmul that does not
  ask for HIGHEST rounded to bf16 (products exact, sums in float32). On
  CPU, jax.default_matmul_precision('bfloat16') changes nothing."""
  def emulated(*args):
    closed, shape = jax.make_jaxpr(_fresh(fn), return_shape=True)(*args)
    out = _eval(closed.jaxpr, closed.consts, jax.tree.leaves(args))
    return jax.tree.unflatten(jax.tree.structure(shape), out)
  return emulated


def _photos():
  """Two bundled photos ([-1, 1], 128 x 128) and their blurred copies."""
  skimage_data = pytest.importorskip("skimage.data")
  from skimage.filters import gaussian
  from skimage.transform import resize

  photos = [resize(p(), (128, 128), anti_aliasing=True)
            for p in (skimage_data.astronaut, skimage_data.chelsea)]
  blurred = [gaussian(p, sigma=1.0, channel_axis=-1) for p in photos]
  to_signed = lambda a: np.stack(a).astype(np.float32) * 2 - 1
  return to_signed(photos), to_signed(blurred)


def _default(op):
  """op with its precision argument dropped (the default precision)."""
  return lambda *args, precision=None, **kwargs: op(*args, **kwargs)


def test_ssim_under_bf16_rounding_matches_scikit_image(monkeypatch):
  from skimage.metrics import structural_similarity

  x, y = _photos()
  want = [structural_similarity(
      (a + 1) / 2, (b + 1) / 2, channel_axis=-1, data_range=1.0,
      gaussian_weights=True, sigma=1.5, use_sample_covariance=False)
      for a, b in zip(x, y, strict=True)]
  assert all(0.5 < w < 0.99 for w in want), want
  got = np.asarray(tpu_default(metrics.ssim)(x, y))
  np.testing.assert_allclose(got, want, atol=2e-5)
  # The emulation bites: with the blurs at the default precision the same
  # photos score hundredths off (the bf16 window no longer sums to 1).
  monkeypatch.setattr(jax.lax, "conv_general_dilated",
                      _default(jax.lax.conv_general_dilated))
  off = np.asarray(tpu_default(metrics.ssim)(x, y))
  assert np.min(np.abs(off - want)) > 0.02, (off, want)


def test_psnr_and_ssim_pinned():
  x = jnp.zeros((2, 16, 16, 3), jnp.bfloat16)  # a bf16 model's output
  check_pinned(metrics.ssim, x, x)
  # PSNR has no matmul: its reductions run in float32.
  assert not stablehlo_matmuls(metrics.psnr, x, x)
  for eqn in _eqns(jax.make_jaxpr(metrics.psnr)(x, x).jaxpr):
    if eqn.primitive.name.startswith("reduce_"):
      assert eqn.invars[0].aval.dtype == jnp.float32, eqn


def test_check_pinned_catches_a_default_conv(monkeypatch):
  x = jnp.zeros((1, 16, 16, 3))
  monkeypatch.setattr(jax.lax, "conv_general_dilated",
                      _default(jax.lax.conv_general_dilated))
  with pytest.raises(AssertionError, match="DEFAULT"):
    check_pinned(metrics.ssim, x, x)


@pytest.fixture(scope="module")
def inception_weights():
  _, state = torch_references.fid_inception()
  return inception.fold_batch_norms(state)


def test_lpips_pinned():
  graphdef, state = nnx.split(lpips.LPIPS(rngs=nnx.Rngs(0)))
  x = jnp.zeros((2, 16, 16, 3), jnp.bfloat16)
  check_pinned(lambda s, a, b: nnx.merge(graphdef, s)(a, b), state, x, x)


def test_inception_features_pinned(inception_weights):
  x = jnp.zeros((1, 16, 16, 3), jnp.bfloat16)
  check_pinned(inception.features, inception_weights, x)


def test_feature_sums_pinned_and_equal_feature_stats():
  rng = np.random.default_rng(0)
  f = rng.normal(size=(6, 5)).astype(np.float32)
  w = np.r_[np.ones(4), np.zeros(2)].astype(np.float32)
  check_pinned(fid.feature_sums, f, w)
  want = fid.FeatureStats(5)
  want.add(f, w)
  got = fid.FeatureStats(5)
  got.add_sums(w.sum(), fid.feature_sums(f, w))
  assert got.count == want.count == 4
  np.testing.assert_allclose(got.sum, want.sum, rtol=1e-6)
  np.testing.assert_allclose(got.outer, want.outer, rtol=1e-5)


class _StubTokenizer:
  """Stands in for a tokenizer (bf16 outputs, as a bf16 model's): the only
  convolutions and matmuls left in batch_metrics are the metrics'."""

  def __call__(self, images, train):
    b = images.shape[0]
    return types.SimpleNamespace(
        reconstructions=(0.9 * images).astype(jnp.bfloat16),
        indices=jnp.zeros((b, 4), jnp.int32),
        index_weight=jnp.ones((b, 4), jnp.float32),
        code_counts=jnp.zeros((16,), jnp.int32))

  def decode(self, indices):
    return jnp.full((indices.shape[0], 16, 16, 3), 0.1, jnp.bfloat16)


def test_tokenizer_batch_metrics_pinned(inception_weights):
  graphdef, state = nnx.split(lpips.LPIPS(rngs=nnx.Rngs(0)))
  weights = evaluate.Weights(inception=inception_weights, lpips=state)
  images = jnp.zeros((2, 16, 16, 3))
  mask = jnp.ones((2,))

  def sums_and_stats(weights, images, mask):
    return evaluate.batch_metrics(_StubTokenizer(), images, mask, weights,
                                  graphdef, prefixes=(2,))[:3]

  check_pinned(sums_and_stats, weights, images, mask)


def test_sample_scores_pinned(inception_weights):
  """evaluate_samples' Inception outputs (pool, spatial, logits), its batch
  step and the precision/recall distances."""
  rng = np.random.default_rng(0)
  weights = dict(inception_weights, fc=(
      rng.normal(size=(inception.FEATURES, inception.LOGITS)).astype(
          np.float32), np.zeros(inception.LOGITS, np.float32)))
  x = jnp.zeros((1, 16, 16, 3), jnp.bfloat16)
  check_pinned(inception.outputs, weights, x)
  images = jnp.zeros((2, 16, 16, 3), jnp.uint8)
  check_pinned(lambda w, i, m, s: generative._batch_outputs(w, i, m, s,
                                                            splits=2),
               weights, images, jnp.ones((2,)), jnp.zeros((2,), jnp.int32))
  a = rng.normal(size=(4, 8)).astype(np.float32)
  check_pinned(generative._squared_distances, a, a, np.sum(a * a, 1))


def test_classifier_feature_network_pinned(tmp_path):
  from cvqcar.evaluation import classifier

  model = classifier.Classifier(3, width=4, rngs=nnx.Rngs(0))
  path = classifier.save(model, str(tmp_path / "clf"), resolution=8)
  network = classifier.feature_network(path)
  check_pinned(network.apply, network.params,
               jnp.zeros((2, 8, 8, 3), jnp.float32))
