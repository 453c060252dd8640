"""CAR on meshes: sharded state, equal losses, HF backbones read by slice."""

import dataclasses
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

from configs import car_stage2
from conftest import tiny_config
from cvqcar import sharding
from cvqcar.car import hf_io
from cvqcar.car import state as car_state
from cvqcar.car import trainer as car_trainer

MESHES = {"data=8": dict(data=8), "fsdp=8": dict(fsdp=8),
          "fsdp=4,model=2": dict(fsdp=4, model=2)}


def car_config(stage=2, hf_dir="", **mesh):
  config = car_stage2.get_config("tiny")
  config.stage = stage
  config.tokenizer = tiny_config().model
  config.batch_size = 8
  config.max_text_len = 12
  config.optimizer.warmup_steps = 1
  config.llm.hf_dir = hf_dir
  config.mesh = ml_collections.ConfigDict(
      {"data": 1, "fsdp": 1, "model": 1, **mesh})
  config.llm_config = dataclasses.asdict(
      car_state.resolve_llm_config(config))
  return config


def batches(config, vocab, steps, seed=0):
  rng = np.random.default_rng(seed)
  b, length = config.batch_size, config.max_text_len
  _, channels, _ = car_state.tokenizer_shape(config.tokenizer)
  for _ in range(steps):
    text = rng.integers(0, vocab, (b, length))
    mask = (np.arange(length)[None] >= rng.integers(0, length // 2, (b, 1)))
    yield {"text": text.astype(np.int32), "text_mask": mask.astype(np.int32),
           "tokens": rng.integers(0, config.tokenizer.num_codes,
                                  (b, channels)).astype(np.int32)}


def train(config, mesh, data, codebook):
  graphdef, state, shardings = car_state.init_state(config, mesh, codebook)
  step_fn = car_trainer.make_train_step(config, graphdef, None, shardings,
                                        mesh)
  losses = []
  for batch in data:
    with jax.set_mesh(mesh):
      state, metrics = step_fn(state, sharding.global_batch(batch, mesh),
                               jax.random.key(1), None)
    losses.append(float(metrics["loss"]))
  return state, losses


def codebook_of(config, seed=0):
  k, _, dim = car_state.tokenizer_shape(config.tokenizer)
  return np.random.default_rng(seed).normal(size=(k, dim)).astype(np.float32)


@pytest.mark.slow
@pytest.mark.parametrize("stage", [1, 2])
def test_same_losses_on_every_mesh(stage):
  single = car_config(stage)
  vocab = single.llm_config["vocab_size"]
  one = sharding.make_mesh(single, devices=jax.devices()[:1])
  _, want = train(single, one, batches(single, vocab, 3),
                  codebook_of(single))
  assert want[0] > want[-1]  # it trains
  # Pure data parallelism shards no weight: checked once, at stage II.
  meshes = {k: v for k, v in MESHES.items() if stage == 2 or k != "data=8"}
  for name, axes in meshes.items():
    config = car_config(stage, **axes)
    mesh = sharding.make_mesh(config)
    state, got = train(config, mesh, batches(config, vocab, 3),
                       codebook_of(config))
    np.testing.assert_allclose(got, want, rtol=2e-5, err_msg=name)
  # The last mesh really splits weights over both fsdp and model.
  specs = {str(x.sharding.spec) for x in jax.tree.leaves(state)}
  assert any("fsdp" in s for s in specs) and any("model" in s for s in specs)
  up = state.params if stage == 2 else state.backbone
  kernel = up["backbone"]["layers"]["mlp"]["up_proj"]["kernel"].get_value()
  assert kernel.sharding.spec == jax.sharding.PartitionSpec(
      None, "fsdp", "model")  # [layers, embed, mlp]


def _hf_checkpoint(directory):
  """A random bf16 Qwen3 saved by transformers in several safetensors."""
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  torch.manual_seed(0)
  hf_config = transformers.Qwen3Config(
      vocab_size=96, hidden_size=64, intermediate_size=128,
      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
      head_dim=16, max_position_embeddings=128, tie_word_embeddings=True)
  model = transformers.Qwen3ForCausalLM(hf_config)
  with torch.no_grad():
    for name, p in model.named_parameters():
      noise = torch.randn_like(p)
      p.copy_(1 + 0.2 * noise if "norm" in name else 0.15 * noise)
  model = model.to(torch.bfloat16).eval()
  model.save_pretrained(directory, safe_serialization=True,
                        max_shard_size="40KB")
  assert os.path.exists(os.path.join(directory, hf_io.HF_INDEX))
  return model


def test_bf16_multi_file_checkpoint_on_fsdp8(tmp_path, monkeypatch):
  torch = pytest.importorskip("torch")
  hf = _hf_checkpoint(str(tmp_path))
  reads = []
  real_read = hf_io.SafetensorsFile.read

  def read(self, name, index):
    out = real_read(self, name, index)
    reads.append((name, out.size, self.shape(name)))
    return out

  monkeypatch.setattr(hf_io.SafetensorsFile, "read", read)
  config = car_config(2, hf_dir=str(tmp_path), fsdp=8)
  config.llm.dtype = "float32"  # compute in fp32 for the parity check
  config.llm_config = dataclasses.asdict(
      car_state.resolve_llm_config(config))
  config.optimizer.learning_rate = 2e-5
  config.cfg_drop_prob = 0.0  # a dropped prompt gives its ids no gradient
  mesh = sharding.make_mesh(config)
  graphdef, state, shardings = car_state.init_state(config, mesh,
                                                    codebook_of(config))
  # Every matrix was read as eight 1/8 slices (the embedding width is split
  # over fsdp), never whole: no device's read covers another's slice.
  matrices = [r for r in reads if len(r[2]) == 2]
  assert matrices and all(size * 8 == np.prod(shape)
                          for _, size, shape in matrices)
  names = {n for n, _, _ in matrices}
  assert all(sum(s for n, s, _ in matrices if n == name) ==
             np.prod(dict((n, sh) for n, _, sh in matrices)[name])
             for name in names)  # each element read exactly once
  backbone = state.params["backbone"]
  for leaf in jax.tree.leaves(backbone):
    assert leaf.dtype == jnp.float32  # bf16 upcast to master weights

  model = state.model(graphdef).backbone
  ids = np.random.default_rng(1).integers(0, 96, (2, 10))
  ours = jax.jit(lambda m, x: m(x))(model, jnp.asarray(ids))
  # Reloaded in float32: .float() would keep RoPE's bf16-rounded inv_freq.
  import transformers

  hf = transformers.Qwen3ForCausalLM.from_pretrained(
      str(tmp_path), dtype=torch.float32).eval()
  with torch.no_grad():
    want = hf(torch.as_tensor(ids)).logits.numpy()
  np.testing.assert_allclose(np.asarray(ours), want, atol=1e-4, rtol=0)

  before = {path: np.asarray(v.get_value())
            for path, v in nnx.to_flat_state(backbone)}
  step_fn = car_trainer.make_train_step(config, graphdef, None, shardings,
                                        mesh)
  data = list(batches(config, 96, 5))
  for i, batch in enumerate(data):  # every text id in every step
    batch["text"][:] = np.random.default_rng(i).permutation(96).reshape(8, 12)
    batch["text_mask"][:] = 1
    with jax.set_mesh(mesh):
      state, _ = step_fn(state, sharding.global_batch(batch, mesh),
                         jax.random.key(2), None)
  after = dict(nnx.to_flat_state(state.params["backbone"]))
  assert len([p for p in before if p[-1] in ("kernel", "embedding")]) == 8
  for path, old in before.items():
    if path[-1] in ("kernel", "embedding"):  # every matrix
      changed = np.mean(np.asarray(after[path].get_value()) != old)
      assert changed >= 0.99, (path, changed)
