"""Tokenizer API: shapes, dtypes, nested dropout, input errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import tiny_config
from cvqcar.tokenizer import model as tokenizer_lib


def images(n=4, res=16, seed=0):
  return jax.random.uniform(jax.random.key(seed), (n, res, res, 3),
                            minval=-1.0, maxval=1.0)


@pytest.mark.parametrize("arg,tokens", [("tiny", 8), ("tiny,patch", 64)])
def test_encode_decode_shapes_and_dtypes(arg, tokens):
  config = tiny_config(arg)
  model = tokenizer_lib.Tokenizer(config.model, rngs=nnx.Rngs(0))
  assert model.num_tokens == tokens == tokenizer_lib.num_tokens(config.model)
  ids = model.encode(images())
  assert ids.shape == (4, tokens) and ids.dtype == jnp.int32
  assert int(ids.max()) < config.model.num_codes
  out = model.decode(ids)
  assert out.shape == (4, 16, 16, 3) and out.dtype == jnp.float32
  fwd = model(images(), train=False)
  np.testing.assert_array_equal(fwd.indices, ids)
  np.testing.assert_allclose(fwd.reconstructions, out, atol=1e-5)


def test_nested_dropout_zeroes_exactly_the_channels_past_k():
  config = tiny_config()
  config.model.nested_dropout_alpha = 1.0  # every image gets a random k
  config.model.codebook.ema = False  # EMA would move codes during the call
  model = tokenizer_lib.Tokenizer(config.model, rngs=nnx.Rngs(0))
  x = images(8)
  out = model(x, train=True, key=jax.random.key(5))
  kept = np.asarray(out.channels_kept)
  assert kept.min() >= 1 and kept.max() <= 8 and len(set(kept)) > 1
  # The decoder saw the first k codewords and zeros: decoding the first k
  # tokens (the public prefix decode) reproduces the training output.
  for b, k in enumerate(kept):
    want = model.decode(out.indices[b:b + 1, :k])
    np.testing.assert_allclose(out.reconstructions[b:b + 1], want, atol=1e-5)
  # And it differs from the full decode whenever k < C.
  b = int(np.argmin(kept))
  full = model.decode(out.indices[b:b + 1])
  assert float(jnp.abs(full - out.reconstructions[b:b + 1]).max()) > 1e-4


def test_nested_dropout_is_off_at_eval_and_alpha_zero():
  config = tiny_config()
  config.model.nested_dropout_alpha = 1.0
  model = tokenizer_lib.Tokenizer(config.model, rngs=nnx.Rngs(0))
  out = model(images(), train=False)
  np.testing.assert_array_equal(out.channels_kept, 8)
  config.model.nested_dropout_alpha = 0.0
  model = tokenizer_lib.Tokenizer(config.model, rngs=nnx.Rngs(0))
  out = model(images(), train=True, key=jax.random.key(0))
  np.testing.assert_array_equal(out.channels_kept, 8)


def test_prefix_decode_rejects_bad_lengths():
  model = tokenizer_lib.Tokenizer(tiny_config().model, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match=r"1\.\.8"):
    model.decode(jnp.zeros((1, 9), jnp.int32))
  patch = tokenizer_lib.Tokenizer(tiny_config("tiny,patch").model,
                                  rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="64 tokens"):
    patch.decode(jnp.zeros((1, 8), jnp.int32))


@pytest.mark.parametrize("bad", [-1, 64, 10**6])
def test_decode_refuses_token_ids_outside_the_codebook(bad):
  model = tokenizer_lib.Tokenizer(tiny_config().model, rngs=nnx.Rngs(0))
  tokens = jnp.zeros((2, 8), jnp.int32).at[1, 3].set(bad)
  with pytest.raises(ValueError, match=rf"token id {bad} is outside 0\.\.63"):
    model.decode(tokens)
  model.decode(tokens.at[1, 3].set(63))  # the last code is fine


@pytest.mark.parametrize("bad,match", [
    (jnp.zeros((2, 32, 32, 3)), r"\[B, 16, 16, 3\].*\(2, 32, 32, 3\)"),
    (jnp.zeros((16, 16, 3)), r"shape \(16, 16, 3\)"),
    (jnp.full((2, 16, 16, 3), 255.0), r"\[-1, 1\].*255"),
    (jnp.zeros((2, 16, 16, 3), jnp.uint8), "dtype uint8"),
])
def test_bad_images_get_clear_errors(bad, match):
  model = tokenizer_lib.Tokenizer(tiny_config().model, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match=match):
    model.encode(bad)


@pytest.mark.parametrize("field,value,match", [
    ("quantize", "grid", "quantize must be one of"),
    ("resolution", 15, "not divisible by the downsample factor"),
    ("nested_dropout_alpha", 1.5, r"in \[0, 1\]"),
])
def test_bad_model_config(field, value, match):
  config = tiny_config()
  config.model[field] = value
  with pytest.raises(ValueError, match=match):
    tokenizer_lib.Tokenizer(config.model, rngs=nnx.Rngs(0))


def test_patch_with_nested_dropout_is_an_error():
  config = tiny_config("tiny,patch")
  config.model.nested_dropout_alpha = 0.5
  with pytest.raises(ValueError, match="needs quantize='channel'"):
    tokenizer_lib.check_model_config(config.model)
