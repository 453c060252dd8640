"""Qwen3 LM: HF parity and round trip, KV-cache decoding, masks, presets."""

import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from cvqcar.car import hf_io, qwen3

# Small enough for 2 CPU cores; kv heads < heads so GQA grouping is exercised.
HF_SHAPE = dict(vocab_size=128, hidden_size=64, intermediate_size=96,
                num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, head_dim=16,
                max_position_embeddings=128)
# Param counts published with keras-hub's Qwen3 presets (exact).
PUBLISHED_PARAMS = {"0.6b": 596_049_920, "1.7b": 1_720_574_976,
                    "4b": 4_022_468_096, "8b": 8_190_735_360}
NOMINAL_PARAMS = {"0.6b": 0.6e9, "1.7b": 1.7e9, "4b": 4e9, "8b": 8e9}


def _random_ids(shape, vocab, seed=0):
  return np.random.default_rng(seed).integers(0, vocab, shape)


def _hf_model(tie: bool, rope_theta=5e4, seed=0):
  """A random fp32 transformers Qwen3ForCausalLM; no download."""
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  torch.manual_seed(seed)
  config = transformers.Qwen3Config(**HF_SHAPE, rope_theta=rope_theta,
                                    tie_word_embeddings=tie)
  model = transformers.Qwen3ForCausalLM(config).eval()
  # HF inits norms to ones and weights to N(0, 0.02): randomise every tensor
  # so a swapped norm or a wrong transpose shows up in the logits.
  with torch.no_grad():
    for name, p in model.named_parameters():
      noise = torch.randn_like(p)
      p.copy_(1 + 0.2 * noise if "norm" in name else 0.15 * noise)
  return model


def _hf_logits(model, ids):
  import torch

  with torch.no_grad():
    return model(torch.as_tensor(ids)).logits.numpy()


def _save_hf(model, directory, **kwargs):
  model.save_pretrained(directory, safe_serialization=True, **kwargs)
  return str(directory)


@pytest.mark.parametrize("tie,sharded", [(True, False), (False, False),
                                         (False, True), (True, True)])
def test_from_hf_matches_transformers_logits(tmp_path, tie, sharded):
  hf = _hf_model(tie)
  directory = _save_hf(hf, tmp_path,
                       **({"max_shard_size": "30KB"} if sharded else {}))
  index = os.path.exists(os.path.join(directory, hf_io.HF_INDEX))
  assert index == sharded
  model, config = hf_io.from_hf(directory)
  assert config.tie_word_embeddings == tie and config.rope_theta == 5e4
  assert (model.lm_head is None) == tie
  ids = _random_ids((2, 9), HF_SHAPE["vocab_size"])
  ours = np.asarray(model(jnp.asarray(ids)))
  want = _hf_logits(hf, ids)
  assert np.abs(want).max() > 1.0  # logits far from zero: a real comparison
  np.testing.assert_allclose(ours, want, atol=1e-4, rtol=0)


@pytest.mark.parametrize("form", ["rope_theta", "rope_parameters"])
def test_both_config_json_rope_forms_load(tmp_path, form):
  hf = _hf_model(tie=True, rope_theta=2e4)
  directory = _save_hf(hf, tmp_path)
  path = os.path.join(directory, "config.json")
  with open(path) as f:
    d = json.load(f)
  for key in ("rope_theta", "rope_parameters", "rope_scaling"):
    d.pop(key, None)
  if form == "rope_theta":  # published Qwen3 checkpoints
    d.update(rope_theta=2e4, rope_scaling=None)
  else:  # transformers 5.x
    d.update(rope_parameters={"rope_theta": 2e4, "rope_type": "default"})
  with open(path, "w") as f:
    json.dump(d, f)
  model, config = hf_io.from_hf(directory)
  assert config.rope_theta == 2e4
  ids = _random_ids((1, 12), HF_SHAPE["vocab_size"], seed=1)
  np.testing.assert_allclose(model(jnp.asarray(ids)), _hf_logits(hf, ids),
                             atol=1e-4, rtol=0)


@pytest.mark.parametrize("rope", [
    {"rope_parameters": {"rope_type": "yarn", "factor": 4.0,
                         "rope_theta": 1e6}},
    {"rope_theta": 1e6, "rope_scaling": {"type": "dynamic", "factor": 2.0}},
])
def test_unknown_rope_type_is_rejected(rope):
  d = dict(model_type="qwen3", **HF_SHAPE, **rope)
  with pytest.raises(ValueError, match="rope_type=.*(yarn|dynamic)"):
    qwen3.Qwen3Config.from_hf_dict(d)


def test_config_errors_name_the_bad_value():
  with pytest.raises(ValueError, match="model_type='qwen2'"):
    qwen3.Qwen3Config.from_hf_dict(dict(model_type="qwen2", **HF_SHAPE))
  with pytest.raises(ValueError, match="num_key_value_heads=3"):
    dataclasses.replace(qwen3.PRESETS["tiny"], num_key_value_heads=3)
  with pytest.raises(ValueError, match="lacks.*vocab_size"):
    qwen3.Qwen3Config.from_hf_dict({"hidden_size": 8})


def test_to_hf_dict_is_read_back_by_transformers():
  transformers = pytest.importorskip("transformers")
  config = dataclasses.replace(qwen3.PRESETS["0.6b"], param_dtype="bfloat16")
  d = config.to_hf_dict()
  hf = transformers.Qwen3Config(**d)
  for key in ("vocab_size", "hidden_size", "intermediate_size", "head_dim",
              "num_hidden_layers", "num_attention_heads",
              "num_key_value_heads", "tie_word_embeddings",
              "max_position_embeddings"):
    assert getattr(hf, key) == d[key], key
  theta = (hf.rope_parameters["rope_theta"]
           if getattr(hf, "rope_parameters", None) else hf.rope_theta)
  assert theta == 1e6
  # config.json has one dtype: the weights', which then also computes.
  assert qwen3.Qwen3Config.from_hf_dict(d) == dataclasses.replace(
      config, dtype="bfloat16")


@pytest.mark.parametrize("tie", [True, False])
def test_to_hf_round_trip_through_transformers(tmp_path, tie):
  pytest.importorskip("torch")  # AutoModelForCausalLM needs it.
  transformers = pytest.importorskip("transformers")
  config = qwen3.Qwen3Config(**HF_SHAPE, rope_theta=3e4,
                           tie_word_embeddings=tie)
  model = qwen3.Qwen3(config, rngs=nnx.Rngs(3))
  # Random norm weights, so a norm exported to the wrong name shows.
  for _, variable in nnx.to_flat_state(nnx.state(model, nnx.Param)):
    if variable.get_metadata()["logical_axes"] == ("norm",):
      noise = jax.random.normal(jax.random.key(7), variable.get_value().shape)
      variable.set_value(1 + 0.2 * noise)
  hf_io.to_hf(model, config, str(tmp_path))
  hf = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path)).eval()
  assert type(hf).__name__ == "Qwen3ForCausalLM"
  ids = _random_ids((2, 7), HF_SHAPE["vocab_size"], seed=2)
  np.testing.assert_allclose(_hf_logits(hf, ids), model(jnp.asarray(ids)),
                             atol=1e-4, rtol=0)
  back, back_config = hf_io.from_hf(str(tmp_path))
  assert back_config == config
  np.testing.assert_array_equal(back(jnp.asarray(ids)), model(jnp.asarray(ids)))


def test_to_hf_bfloat16_export_loads_back_upcast(tmp_path):
  config = qwen3.Qwen3Config(**HF_SHAPE)
  model = qwen3.Qwen3(config, rngs=nnx.Rngs(0))
  hf_io.to_hf(model, dataclasses.replace(config, param_dtype="bfloat16"),
              str(tmp_path))
  # Master weights upcast to float32 on load; bfloat16 when asked.
  back, back_config = hf_io.from_hf(str(tmp_path))
  assert back_config.param_dtype == "float32"
  assert back_config.dtype == "bfloat16"  # the file's dtype computes
  kernel = back.layer(1).mlp.down_proj.kernel.get_value()
  assert kernel.dtype == jnp.float32
  want = model.layer(1).mlp.down_proj.kernel.get_value().astype(jnp.bfloat16)
  np.testing.assert_array_equal(kernel, want.astype(jnp.float32))
  assert not np.array_equal(kernel, model.layer(1).mlp.down_proj.kernel
                            .get_value())  # rounded, so really bf16 on disk
  kept, _ = hf_io.from_hf(str(tmp_path), param_dtype="bfloat16")
  assert kept.layer(1).mlp.down_proj.kernel.get_value().dtype == jnp.bfloat16
  with pytest.raises(ValueError, match="does not describe the model"):
    hf_io.to_hf(model, dataclasses.replace(config, num_hidden_layers=3),
                str(tmp_path))


def test_missing_shard_names_the_file(tmp_path):
  directory = _save_hf(_hf_model(tie=False), tmp_path, max_shard_size="30KB")
  with open(os.path.join(directory, hf_io.HF_INDEX)) as f:
    shard = sorted(set(json.load(f)["weight_map"].values()))[1]
  os.remove(os.path.join(directory, shard))
  with pytest.raises(FileNotFoundError, match=shard):
    hf_io.from_hf(directory)


def test_missing_tensor_names_the_tensor(tmp_path):
  safetensors_numpy = pytest.importorskip("safetensors.numpy")
  directory = _save_hf(_hf_model(tie=False), tmp_path)
  path = os.path.join(directory, "model.safetensors")
  tensors = safetensors_numpy.load_file(path)
  del tensors["model.layers.1.self_attn.k_norm.weight"]
  safetensors_numpy.save_file(tensors, path, metadata={"format": "pt"})
  with pytest.raises(KeyError, match=r"layers\.1\.self_attn\.k_norm"):
    hf_io.from_hf(directory)


def test_missing_checkpoint_is_a_clear_error(tmp_path):
  with pytest.raises(FileNotFoundError, match="config.json"):
    hf_io.from_hf(str(tmp_path))
  with open(tmp_path / "config.json", "w") as f:
    json.dump(qwen3.PRESETS["tiny"].to_hf_dict(), f)
  with pytest.raises(FileNotFoundError, match="model.safetensors"):
    hf_io.from_hf(str(tmp_path))


# Jitted: eager dispatch compiles every op for every new shape, ~10x slower.
_apply = nnx.jit(lambda model, ids, **kwargs: model(ids, **kwargs))


def _tiny_model(seed=0, **changes):
  config = dataclasses.replace(qwen3.PRESETS["tiny"], **changes)
  return qwen3.Qwen3(config, rngs=nnx.Rngs(seed))


def _greedy_cached(model, prompt, steps):
  graphdef, state = nnx.split(model)

  @jax.jit
  def step(state, ids, cache):
    logits, cache = nnx.merge(graphdef, state)(ids, cache=cache)
    return jnp.argmax(logits[:, -1], -1), cache

  cache = model.init_cache(prompt.shape[0], prompt.shape[1] + steps)
  token, cache = step(state, prompt, cache)
  tokens = [token]
  for _ in range(steps - 1):
    token, cache = step(state, token[:, None], cache)
    tokens.append(token)
  assert int(cache.index) == prompt.shape[1] + steps - 1
  return np.stack(tokens, 1)


def _greedy_full(model, prompt, steps):
  graphdef, state = nnx.split(model)
  b, p = prompt.shape

  @jax.jit
  def step(state, buffer, n):
    logits = nnx.merge(graphdef, state)(buffer)  # [B, P+steps, V]
    return jnp.argmax(jax.lax.dynamic_index_in_dim(logits, n - 1, 1, False),
                      -1)

  # A fixed-size buffer keeps one compilation; causality hides the tail.
  buffer = jnp.zeros((b, p + steps), jnp.int32).at[:, :p].set(prompt)
  tokens = []
  for n in range(p, p + steps):
    token = step(state, buffer, n)
    buffer = buffer.at[:, n].set(token)
    tokens.append(token)
  return np.stack(tokens, 1)


def test_kv_cache_greedy_decode_equals_full_recompute():
  # Untied: a small tied model just repeats its last token.
  model = _tiny_model(tie_word_embeddings=False)
  prompt = jnp.asarray(_random_ids((2, 5), 512, seed=4), jnp.int32)
  cached = _greedy_cached(model, prompt, steps=8)
  full = _greedy_full(model, prompt, steps=8)
  np.testing.assert_array_equal(cached, full)
  assert len(np.unique(cached)) > 2  # not a degenerate repeat


def test_kv_cache_greedy_decode_equals_transformers_generate(tmp_path):
  torch = pytest.importorskip("torch")
  hf = _hf_model(tie=False)
  model, _ = hf_io.from_hf(_save_hf(hf, tmp_path))
  prompt = _random_ids((2, 4), HF_SHAPE["vocab_size"], seed=5)
  with torch.no_grad():
    want = hf.generate(torch.as_tensor(prompt), max_new_tokens=6,
                       do_sample=False, min_new_tokens=6)[:, 4:].numpy()
  np.testing.assert_array_equal(
      _greedy_cached(model, jnp.asarray(prompt), steps=6), want)


def test_changing_token_t_leaves_earlier_logits_unchanged():
  model = _tiny_model()
  ids = jnp.asarray(_random_ids((2, 10), 512, seed=6))
  t = 6
  changed = ids.at[:, t].set((ids[:, t] + 1) % 512)
  a, b = _apply(model, ids), _apply(model, changed)
  np.testing.assert_allclose(a[:, :t], b[:, :t], atol=1e-6, rtol=0)
  assert float(jnp.abs(a[:, t:] - b[:, t:]).min(-1).max()) > 1e-4


def test_left_padding_is_ignored_with_and_without_cache():
  model = _tiny_model()
  ids = jnp.asarray(_random_ids((1, 6), 512, seed=7))
  pad = 3
  padded = jnp.concatenate([jnp.full((1, pad), 7), ids], 1)
  mask = jnp.arange(pad + 6)[None] >= pad
  positions = jnp.maximum(jnp.arange(pad + 6)[None] - pad, 0)
  want = _apply(model, ids)
  got = _apply(model, padded, positions=positions, attention_mask=mask)
  np.testing.assert_allclose(got[:, pad:], want, atol=1e-5, rtol=0)
  assert np.isfinite(np.asarray(got)).all()
  # Decoding one more token: the cache must remember the padding.
  nxt = jnp.asarray([[11]])
  _, cache = _apply(model, padded, positions=positions, attention_mask=mask,
                    cache=model.init_cache(1, 16))
  got_next, _ = _apply(model, nxt, positions=jnp.asarray([[6]]), cache=cache)
  want_next = _apply(model, jnp.concatenate([ids, nxt], 1))[:, -1:]
  np.testing.assert_allclose(got_next, want_next, atol=1e-5, rtol=0)


def test_forward_embeddings_and_logits_compose_to_call():
  model = _tiny_model(tie_word_embeddings=False)
  ids = jnp.asarray(_random_ids((2, 5), 512, seed=8))
  hidden, cache = model.forward_embeddings(model.embed(ids))
  assert hidden.shape == (2, 5, 64) and cache is None
  np.testing.assert_allclose(model.logits(hidden), model(ids), atol=1e-6)
  with pytest.raises(ValueError, match=r"expected \[B, T, 64\]"):
    model.forward_embeddings(jnp.zeros((2, 5, 32)))
  with pytest.raises(ValueError, match="max_len 4"):
    model(ids, cache=model.init_cache(2, 4))
  with pytest.raises(ValueError, match=r"positions \(5,\)"):
    model(ids, positions=jnp.arange(5))


def test_every_param_carries_logical_axes():
  for tie in (True, False):
    model = _tiny_model(tie_word_embeddings=tie)
    for path, variable in nnx.to_flat_state(nnx.state(model, nnx.Param)):
      names = variable.get_metadata().get("logical_axes")
      assert names is not None, path
      assert len(names) == variable.get_value().ndim, path
      assert set(names) <= {"vocab", "embed", "heads", "kv_heads", "mlp",
                            "norm", "layers"}, path
      assert ("layers" in names) == (path[0] == "layers"), path


@pytest.mark.parametrize("name", sorted(PUBLISHED_PARAMS))
def test_preset_param_counts_match_published(name):
  count = qwen3.param_count(qwen3.PRESETS[name])
  assert count == PUBLISHED_PARAMS[name]
  assert abs(count / NOMINAL_PARAMS[name] - 1) < 0.03


def _loss_and_grads(model, ids):
  graphdef, state = nnx.split(model)

  @jax.jit
  def run(state):
    def loss(state):
      logits = nnx.merge(graphdef, state)(ids)
      return jnp.mean(jax.nn.logsumexp(logits, -1) - logits[..., 0])
    return jax.value_and_grad(loss)(state)

  return run(state)


@pytest.mark.parametrize("changes", [
    dict(scan_layers=False),
    dict(remat="full"),
    dict(remat="save-dots", scan_layers=False),
    dict(attention="plain"),
    dict(attention="xla", remat="save-dots"),
])
def test_trunk_variants_give_the_same_logits_and_gradients(changes):
  # The reference: scanned, no remat, and the einsum attention.
  ref = _tiny_model(seed=1, attention="plain", num_hidden_layers=3)
  state = nnx.state(ref)
  config = dataclasses.replace(ref.config, **changes)
  other = nnx.merge(nnx.graphdef(qwen3.Qwen3(config, rngs=nnx.Rngs(0))),
                    state)
  ids = jnp.asarray(_random_ids((2, 11), 512, seed=9))
  np.testing.assert_allclose(_apply(other, ids), _apply(ref, ids), atol=2e-5,
                             rtol=0)
  (la, ga), (lb, gb) = _loss_and_grads(ref, ids), _loss_and_grads(other, ids)
  np.testing.assert_allclose(la, lb, rtol=1e-5)
  flat_a, flat_b = jax.tree.leaves(ga), jax.tree.leaves(gb)
  assert len(flat_a) == len(flat_b)
  for a, b in zip(flat_a, flat_b, strict=True):
    assert float(jnp.abs(a).max()) > 0  # every weight gets a gradient
    np.testing.assert_allclose(b, a, atol=2e-6, rtol=1e-4)


def test_kv_cache_decode_equals_full_recompute_unscanned_and_scanned():
  model = _tiny_model(tie_word_embeddings=False, num_hidden_layers=3)
  loop = nnx.merge(nnx.graphdef(qwen3.Qwen3(dataclasses.replace(
      model.config, scan_layers=False), rngs=nnx.Rngs(0))), nnx.state(model))
  prompt = jnp.asarray(_random_ids((2, 5), 512, seed=10), jnp.int32)
  full = _greedy_full(model, prompt, steps=6)
  np.testing.assert_array_equal(_greedy_cached(model, prompt, 6), full)
  np.testing.assert_array_equal(_greedy_cached(loop, prompt, 6), full)


def test_bad_trunk_options_are_named():
  with pytest.raises(ValueError, match="remat='some'"):
    dataclasses.replace(qwen3.PRESETS["tiny"], remat="some")
  with pytest.raises(ValueError, match="attention='flash'"):
    dataclasses.replace(qwen3.PRESETS["tiny"], attention="flash")


def test_presets_keep_float32_master_weights_and_compute_in_bf16():
  for name in ("0.6b", "1.7b", "4b", "8b"):
    config = qwen3.PRESETS[name]
    assert (config.param_dtype, config.dtype) == ("float32", "bfloat16")
  model = _tiny_model(dtype="bfloat16")
  ids = jnp.asarray(_random_ids((1, 4), 512))
  assert _apply(model, ids).dtype == jnp.bfloat16
  for leaf in jax.tree.leaves(nnx.state(model, nnx.Param)):
    assert leaf.dtype == jnp.float32


def test_multi_file_export_round_trips_through_transformers(tmp_path):
  pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  config = qwen3.Qwen3Config(**HF_SHAPE, tie_word_embeddings=False)
  model = qwen3.Qwen3(config, rngs=nnx.Rngs(4))
  hf_io.to_hf(model, config, str(tmp_path), max_shard_bytes=40_000)
  with open(tmp_path / hf_io.HF_INDEX) as f:
    assert len(set(json.load(f)["weight_map"].values())) > 3
  hf = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path)).eval()
  ids = _random_ids((2, 6), HF_SHAPE["vocab_size"], seed=3)
  np.testing.assert_allclose(_hf_logits(hf, ids), _apply(model, ids),
                             atol=1e-4, rtol=0)
