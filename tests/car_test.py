"""CAR: causality, guidance, KV-cache decoding, stage I/II freezing."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from flax import nnx

from cvqcar.car import model as car_lib
from cvqcar.car import qwen3, sampling
from cvqcar.car import trainer as car_trainer

C, K, D = 8, 64, 16


def tiny_car(seed=0):
  backbone = qwen3.Qwen3(qwen3.PRESETS["tiny"], rngs=nnx.Rngs(seed))
  codebook = jax.random.normal(jax.random.key(seed), (K, D))
  return car_lib.CAR(backbone, codebook, C, rngs=nnx.Rngs(seed + 1))


def prompts():
  text = jnp.array([[0, 0, 5, 6], [1, 2, 3, 4]])
  mask = jnp.array([[0, 0, 1, 1], [1, 1, 1, 1]])
  return text, mask


def test_logits_shape_and_left_padding_is_finite():
  model = tiny_car()
  text, mask = prompts()
  tokens = jax.random.randint(jax.random.key(1), (2, C), 0, K)
  logits = model(text, mask, tokens)
  assert logits.shape == (2, C, K) and bool(jnp.isfinite(logits).all())


def test_changing_image_token_t_never_changes_earlier_logits():
  model = tiny_car()
  text, mask = prompts()
  tokens = jax.random.randint(jax.random.key(1), (2, C), 0, K)
  base = model(text, mask, tokens)
  for t in range(C):
    changed = tokens.at[:, t].set((tokens[:, t] + 1) % K)
    out = model(text, mask, changed)
    # Position t predicts token t from tokens < t: positions <= t unchanged.
    np.testing.assert_allclose(out[:, :t + 1], base[:, :t + 1], atol=1e-5)
    if t + 1 < C:
      assert float(jnp.abs(out[:, t + 1:] - base[:, t + 1:]).max()) > 1e-6


def test_left_padding_does_not_change_the_result():
  model = tiny_car()
  tokens = jax.random.randint(jax.random.key(1), (1, C), 0, K)
  short = model(jnp.array([[5, 6]]), jnp.array([[1, 1]]), tokens)
  padded = model(jnp.array([[9, 9, 5, 6]]), jnp.array([[0, 0, 1, 1]]),
                 tokens)
  np.testing.assert_allclose(padded, short, atol=1e-5)


def test_guidance_scale_one_is_conditional_zero_unconditional():
  cond = jnp.array([[1.0, 3.0]])
  uncond = jnp.array([[2.0, -1.0]])
  np.testing.assert_allclose(car_lib.guided_logits(cond, uncond, 1.0), cond)
  np.testing.assert_allclose(car_lib.guided_logits(cond, uncond, 0.0), uncond)
  # And in the sampler: greedy CFG-0 equals greedy on an empty prompt.
  model = tiny_car()
  graphdef, state = nnx.split(model)
  text, mask = prompts()
  key = jax.random.key(0)
  g0 = sampling.generate(graphdef, (state,), text, mask, key, temperature=0.0,
                       cfg_scale=0.0)
  empty = sampling.generate(graphdef, (state,), text, jnp.zeros_like(mask),
                          key, temperature=0.0, cfg_scale=1.0)
  np.testing.assert_array_equal(g0, empty)
  g1 = sampling.generate(graphdef, (state,), text, mask, key, temperature=0.0,
                       cfg_scale=1.0)
  assert g1.shape == (2, C) and not np.array_equal(g1, empty)


@pytest.mark.parametrize("kwargs", [
    dict(temperature=0.0, cfg_scale=1.0),
    dict(temperature=0.0, cfg_scale=3.0),
    dict(temperature=1.0, top_k=5, top_p=0.9, cfg_scale=2.0),
])
def test_kv_cache_decode_equals_full_recompute(kwargs):
  model = tiny_car()
  graphdef, state = nnx.split(model)
  text, mask = prompts()
  key = jax.random.key(3)
  cached = sampling.generate(graphdef, (state,), text, mask, key, **kwargs)
  full = sampling.generate(graphdef, (state,), text, mask, key,
                         use_cache=False, **kwargs)
  np.testing.assert_array_equal(cached, full)


def test_top_k_and_top_p_filters():
  logits = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05]]))
  kept = lambda **kw: np.isfinite(np.asarray(sampling.filter_logits(logits,
                                                                  **kw)))
  np.testing.assert_array_equal(kept(top_k=2), [[1, 1, 0, 0]])
  np.testing.assert_array_equal(kept(top_p=0.7), [[1, 1, 0, 0]])
  np.testing.assert_array_equal(kept(top_p=0.1), [[1, 0, 0, 0]])


def test_prompt_dropout_empties_whole_prompts():
  mask = jnp.ones((1000, 4), jnp.int32)
  dropped = car_lib.drop_prompts(mask, 0.3, jax.random.key(0))
  rows = np.asarray(dropped).sum(-1)
  assert set(np.unique(rows)) == {0, 4}
  assert 0.25 < np.mean(rows == 0) < 0.35


@pytest.mark.parametrize("stage", [1, 2])
def test_stage_freezing(stage):
  model = tiny_car()
  graphdef, params, frozen = nnx.split(model, car_lib.trainable(stage), ...)
  text, mask = prompts()
  tokens = jax.random.randint(jax.random.key(1), (2, C), 0, K)
  tx = optax.adam(1e-2)

  def loss(p):
    return car_lib.loss_fn(nnx.merge(graphdef, p, frozen)(text, mask, tokens),
                       tokens)

  grads = jax.grad(loss)(params)
  updates, _ = tx.update(grads, tx.init(params), params)
  new = nnx.merge(graphdef, optax.apply_updates(params, updates), frozen)
  before = nnx.state(model, nnx.Param)
  after = nnx.state(new, nnx.Param)
  flat_before = dict(nnx.to_flat_state(before))
  for path, var in nnx.to_flat_state(after):
    same = np.array_equal(np.asarray(var[...]),
                          np.asarray(flat_before[path][...]))
    if path[0] == "backbone" and stage == 1:
      assert same, path  # LLM bit-identical in stage I
    else:
      assert not same, path  # projector / head (and LLM in II) changed
  # The tokenizer codebook is never trained.
  assert "codebook_kd" not in dict(nnx.to_flat_state(params)).keys()


@pytest.mark.parametrize("kwargs,match", [
    (dict(temperature=-1.0), "temperature must be > 0"),
    (dict(temperature=float("nan")), "temperature must be > 0"),
    (dict(top_k=-1), rf"top_k must be in 0\.\.{K}.*got -1"),
    (dict(top_k=K + 1), rf"top_k must be in 0\.\.{K}.*got {K + 1}"),
    (dict(top_p=0.0), r"top_p must be in \(0, 1\].*got 0.0"),
    (dict(top_p=1.5), r"top_p must be in \(0, 1\].*got 1.5"),
])
def test_sampling_refuses_bad_settings(kwargs, match):
  graphdef, state = nnx.split(tiny_car())
  text, mask = prompts()
  with pytest.raises(ValueError, match=match):
    sampling.generate(graphdef, (state,), text, mask, jax.random.key(0),
                      **kwargs)


def test_greedy_and_edge_settings_are_accepted():
  graphdef, state = nnx.split(tiny_car())
  text, mask = prompts()
  for kwargs in (dict(temperature=0.0), dict(top_k=K, top_p=1.0),
                 dict(top_k=1, top_p=1e-3)):
    tokens = sampling.generate(graphdef, (state,), text, mask,
                               jax.random.key(0), **kwargs)
    assert tokens.shape == (2, C)


@pytest.mark.parametrize("bad", [-1, K])
def test_embedding_refuses_token_ids_outside_the_codebook(bad):
  model = tiny_car()
  with pytest.raises(ValueError, match=rf"token id {bad} is outside"
                     rf" 0\.\.{K - 1}"):
    model.embed_image_tokens(jnp.full((1, 3), bad, jnp.int32))


@pytest.mark.parametrize("spec,hf_dir,expect", [
    ("auto", "", "bytes"),  # random backbone: byte-level ids
    ("auto", "/ckpt/qwen3", "/ckpt/qwen3"),  # its tokenizer.json
    ("/tok/tokenizer.json", "/ckpt/qwen3", "/tok/tokenizer.json"),
    ("bytes", "", "bytes"),
])
def test_text_tokenizer_follows_the_backbone(spec, hf_dir, expect):
  config = ml_collections.ConfigDict(
      {"text_tokenizer": spec, "llm": {"hf_dir": hf_dir}})
  assert car_trainer.resolve_text_tokenizer(config) == expect


def test_byte_tokenizer_with_a_pretrained_backbone_is_refused():
  config = ml_collections.ConfigDict(
      {"text_tokenizer": "bytes", "llm": {"hf_dir": "/ckpt/qwen3"}})
  with pytest.raises(ValueError, match=r"'bytes'.*'/ckpt/qwen3'"):
    car_trainer.resolve_text_tokenizer(config)
