"""DQ-VAE's dynamic quantization: routing, token sequences, decoding."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from PIL import Image

from configs import cvq_tokenizer
from conftest import tiny_config, tiny_dq_transformer_config
from cvqcar import checkpoint, train_dq
from cvqcar.data import images as image_data
from cvqcar.dq import trainer as dq_trainer
from cvqcar.dq import transformer as dq
from cvqcar.tokenizer import dynamic, export
from cvqcar.tokenizer import model as tokenizer_lib
from cvqcar.tokenizer import trainer as tokenizer_trainer


def _config(**model):
  config = cvq_tokenizer.get_config("tiny,budget=64,dynamic")
  config.model.update(model)
  return config


def test_sequence_order_lengths_and_round_trip():
  # Hand-made: 4 regions, regions 1 and 3 fine.
  coarse = jnp.array([[7, 8, 9, 10]])
  fine = jnp.arange(16).reshape(1, 4, 4) + 100
  mask = jnp.array([[False, True, False, True]])
  tokens = dynamic.sequence(coarse, fine, mask)
  assert tokens.lengths.tolist() == [10]
  assert tokens.positions[0].tolist() == [0, 2, 8, 9, 10, 11, 16, 17, 18, 19,
                                          20, 20, 20, 20, 20, 20]
  assert tokens.codes[0, :10].tolist() == [7, 9, 104, 105, 106, 107, 112,
                                           113, 114, 115]
  # Random batches invert exactly where used.
  rng = np.random.default_rng(0)
  r = 16
  coarse = jnp.asarray(rng.integers(0, 50, (5, r)))
  fine = jnp.asarray(rng.integers(0, 50, (5, r, 4)))
  mask = jnp.asarray(rng.random((5, r)) < 0.4)
  tokens = dynamic.sequence(coarse, fine, mask)
  np.testing.assert_array_equal(tokens.lengths, r + 3 * mask.sum(1))
  c2, f2, m2 = dynamic.unsequence(tokens, r)
  np.testing.assert_array_equal(m2, mask)
  np.testing.assert_array_equal(np.where(mask, 0, c2), np.where(mask, 0,
                                                                 coarse))
  np.testing.assert_array_equal(np.where(mask[..., None], f2, 0),
                                np.where(mask[..., None], fine, 0))
  for b in range(5):
    pos = np.asarray(tokens.positions[b, :tokens.lengths[b]])
    assert (np.diff(pos) > 0).all()  # coarse (< R) before fine (>= R)


def test_coarse_region_decodes_from_one_code_and_fine_from_four():
  q = dynamic.DynamicQuantizer(32, 6, 4, 4, position="none",
                               rngs=nnx.Rngs(0))
  rng = np.random.default_rng(1)
  coarse = jnp.asarray(rng.integers(0, 32, (3, 4)))
  fine = jnp.asarray(rng.integers(0, 32, (3, 4, 4)))
  mask = jnp.asarray(rng.random((3, 4)) < 0.5)
  tokens = dynamic.sequence(coarse, fine, mask)
  cells = dynamic.to_regions(q.lookup(tokens))  # [B, R, 4, C]
  book = q.vq.codebook()
  for b in range(3):
    for r in range(4):
      want = book[fine[b, r]] if mask[b, r] else jnp.broadcast_to(
          book[coarse[b, r]], (4, 6))
      np.testing.assert_allclose(cells[b, r], want)
  # Codes past a sequence's length are ignored.
  noisy = tokens._replace(codes=jnp.where(
      jnp.arange(16)[None] >= tokens.lengths[:, None], 31, tokens.codes))
  np.testing.assert_array_equal(q.lookup(noisy), q.lookup(tokens))
  assert dynamic.from_regions(cells, 4, 4).shape == (3, 4, 4, 6)


def test_position_embedding_tells_a_coarse_regions_cells_apart():
  q = dynamic.DynamicQuantizer(32, 6, 4, 4, rngs=nnx.Rngs(0))
  plain = dynamic.DynamicQuantizer(32, 6, 4, 4, position="none",
                                   rngs=nnx.Rngs(0))
  tokens = dynamic.sequence(jnp.full((1, 4), 5), jnp.zeros((1, 4, 4), int),
                            jnp.zeros((1, 4), bool))  # all coarse
  with_pos, without = q.lookup(tokens), plain.lookup(tokens)
  cells = dynamic.to_regions(with_pos)[0]  # [R, 4, C]
  assert float(jnp.min(jnp.abs(cells[:, 1:] - cells[:, :1]))) > 0
  # The embedding: sin(W [x, y] + b) + row + column, x, y in [-1, 1].
  pe = q.position
  w, b = np.asarray(pe.fourier.kernel[...]), np.asarray(pe.fourier.bias[...])
  rows, cols = np.asarray(pe.rows_hc[...]), np.asarray(pe.cols_wc[...])
  grid = np.linspace(-1, 1, 4)
  want = np.stack([np.stack([np.sin(np.array([grid[j], grid[i]]) @ w + b)
                             + rows[i] + cols[j] for j in range(4)])
                   for i in range(4)])
  np.testing.assert_allclose(np.asarray(with_pos - without)[0], want,
                             atol=1e-5)
  assert np.abs(w).max() <= (9 / 2) ** 0.5 and np.abs(rows).max() <= 2
  with pytest.raises(ValueError, match="dynamic.position must be one of"):
    dynamic.DynamicQuantizer(32, 6, 4, 4, position="sine", rngs=nnx.Rngs(0))


def test_encode_decode_round_trips_the_quantized_latent():
  model = tokenizer_lib.Tokenizer(_config().model, rngs=nnx.Rngs(0))
  images = jax.random.uniform(jax.random.key(0), (4, 32, 32, 3), minval=-1)
  fine, coarse = model.encoder(images)  # the dual-grain encoder
  assert fine.shape == (4, 8, 8, 64) and coarse.shape == (4, 4, 4, 64)
  out = model.quantizer(fine, coarse_bhwc=coarse)
  tokens = model.encode(images)
  np.testing.assert_allclose(model.quantizer.lookup(tokens),
                             out.vq.quantized, atol=1e-6)
  np.testing.assert_allclose(model.decode(tokens),
                             model(images).reconstructions, atol=1e-5)
  # Usage counts only the codes in use; the forward reports them.
  fwd = model(images)
  assert float(fwd.index_weight.sum()) == float(tokens.lengths.sum())
  assert float(fwd.code_counts.sum()) == float(tokens.lengths.sum())
  with pytest.raises(ValueError, match="DynamicTokens"):
    model.decode(tokens.codes)


def test_flat_images_use_fewer_codes_than_textured_ones():
  model = tokenizer_lib.Tokenizer(_config().model, rngs=nnx.Rngs(0))
  flat = jnp.full((2, 32, 32, 3), 0.3)
  photos = image_data.embedded_photos("eval")
  gravel = np.asarray(photos[-1]["image"][:32, :32], np.float32) / 127.5 - 1
  noise = jax.random.uniform(jax.random.key(1), (32, 32, 3), minval=-1)
  textured = jnp.stack([jnp.asarray(gravel), noise])
  flat_len = model.encode(flat).lengths
  textured_len = model.encode(textured).lengths
  assert int(flat_len.max()) < int(textured_len.min()), (flat_len,
                                                          textured_len)


@pytest.mark.parametrize("target", [0.25, 0.5, 0.75])
def test_calibrated_threshold_codes_the_target_share_fine(target):
  """Calibrated with decay 0 on some latents, encode on them codes exactly
  the target share of regions fine (up to one region)."""
  q = dynamic.DynamicQuantizer(64, 6, 8, 8, fine_fraction=target,
                               calibration_decay=0.0, pooled_coarse=True,
                               rngs=nnx.Rngs(0))
  z = jax.random.normal(jax.random.key(0), (8, 8, 8, 6))
  assert q.threshold_at_eval().tolist() == [0.0]  # before calibration
  before = q.eval_threshold[...]
  q(z, train=True, key=jax.random.key(1))  # training does not calibrate
  assert np.isnan(float(q.eval_threshold[...])) and np.isnan(float(before))
  q.calibrate(q.scores(z))
  fine = q(z).fine_gate
  assert abs(float(jnp.mean(fine)) - target) <= 1 / fine.size
  with pytest.raises(ValueError, match="calibration_decay"):
    dynamic.DynamicQuantizer(64, 6, 8, 8, calibration_decay=1.0,
                             rngs=nnx.Rngs(0))


@pytest.mark.parametrize("router", ["learned", "entropy"])
def test_three_levels_meet_both_targets_once_calibrated(router):
  q = dynamic.DynamicQuantizer(64, 6, 16, 16, levels=3, fine_fraction=0.3,
                               medium_fraction=0.4, calibration_decay=0.0,
                               router=router, rngs=nnx.Rngs(0))
  key = jax.random.key(0)
  z = jax.random.normal(key, (8, 16, 16, 6))
  coarse = (jax.random.normal(key, (8, 4, 4, 6)),
            jax.random.normal(key, (8, 8, 8, 6)))
  images = jax.random.uniform(key, (8, 32, 32, 3), minval=-1)
  images = images * jnp.linspace(0, 1, 32)[:, None, None]  # varied detail
  q.calibrate(q.scores(z, images))
  out = q(z, images=images, coarse_bhwc=coarse)
  level = np.asarray(out.level)
  # Each threshold is within one region of its quantile.
  np.testing.assert_allclose([np.mean(level >= 1), np.mean(level >= 2)],
                             [0.7, 0.3], atol=1 / 128)
  # The sequence holds 1, 4 or 16 codes a region at its level's ids.
  tokens = out.tokens
  np.testing.assert_array_equal(
      tokens.lengths, np.asarray(jnp.sum(4 ** out.level, axis=1)))
  np.testing.assert_allclose(
      dynamic.level_shares(tokens, 16, 3), jax.nn.one_hot(out.level, 3
                                                           ).mean(1))
  dq.check_sequences(tokens.positions, tokens.lengths, 16, levels=3)
  # Training: the entropy router's exact shares; the learned one's gates
  # nest (fine implies medium) and its budget loss sees both levels.
  train = q(z, images=images, coarse_bhwc=coarse, train=True,
            key=jax.random.key(1))
  if router == "entropy":
    assert [int(jnp.sum(train.level >= k)) for k in (1, 2)] == [90, 38]
    assert int(jnp.sum(train.level != out.level)) <= 2
  else:
    want = sum((float(jnp.mean(train.level >= k)) - t) ** 2
               for k, t in ((1, 0.7), (2, 0.3)))
    np.testing.assert_allclose(float(train.budget_loss), want, rtol=1e-5)
  with pytest.raises(ValueError, match="medium_fraction must be in"):
    dynamic.DynamicQuantizer(64, 6, 16, 16, levels=3, fine_fraction=0.5,
                             medium_fraction=0.6, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="divisible by 4"):
    dynamic.DynamicQuantizer(64, 6, 6, 6, levels=3, rngs=nnx.Rngs(0))


def test_three_level_sequences_round_trip():
  rng = np.random.default_rng(0)
  b, r = 5, 4
  codes = [jnp.asarray(rng.integers(0, 50, (b, r, 4 ** g))) for g in range(3)]
  level = jnp.asarray(rng.integers(0, 3, (b, r)))
  tokens = dynamic.sequence_levels(codes, level)
  assert tokens.codes.shape == (b, 16 * r)
  np.testing.assert_array_equal(tokens.lengths, jnp.sum(4 ** level, 1))
  back, level2 = dynamic.unsequence_levels(tokens, r, 3)
  np.testing.assert_array_equal(level2, level)
  for g in range(3):
    used = (level == g)[..., None]
    np.testing.assert_array_equal(np.where(used, back[g], 0),
                                  np.where(used, codes[g], 0))
  for i in range(b):
    pos = np.asarray(tokens.positions[i, :tokens.lengths[i]])
    assert (np.diff(pos) > 0).all()
  assert int(tokens.positions.max()) == 21 * r  # END pads


@pytest.mark.slow
@pytest.mark.parametrize("target", [0.25, 0.5, 0.75])
def test_the_fine_share_meets_its_target_in_training_and_on_held_out_images(
    target):
  config = _config()
  config.model.dynamic.fine_fraction = target
  config.model.num_codes = 256
  config.batch_size = 8
  config.data.num_eval_images = 64
  config.num_train_steps = 40
  config.optimizer.warmup_steps = 1
  trainer = tokenizer_trainer.Trainer(config)
  state = trainer.init()
  data = iter(image_data.train_dataset(config))
  shares = []
  for _ in range(config.num_train_steps):
    state, m = trainer.step(state, next(data))
    shares.append(float(m["fine_share"]))
  first, last = np.mean(shares[:5]), np.mean(shares[-10:])
  assert abs(last - target) < max(0.1, 0.5 * abs(first - target)), shares
  # Where encode runs: the EMA weights with the thresholds calibrated on
  # training batches (as the training loop does before each eval), on
  # held-out crops of the training distribution (drawn with another seed;
  # no training batch held them).
  state = trainer.calibrate(state, itertools.islice(
      image_data.train_dataset(config, 0),
      config.model.dynamic.calibration_batches))
  held_out = image_data.padded_eval_batches(
      image_data.embedded_photos("train"),
      image_data.Preprocess(32, crop="random_scale", min_scale=0.15),
      batch_size=64, seed=12345, num_examples=256, num_threads=2)
  result, _ = trainer.evaluate(state, held_out)
  assert abs(result["eval/fine_share"] - target) < 0.05, result


def test_config_errors_name_the_field():
  with pytest.raises(ValueError, match="latent grid divisible by 2"):
    tokenizer_lib.check_model_config(
        cvq_tokenizer.get_config("tiny,budget=9,dynamic,res=12").model)
  bad = _config(nested_dropout_alpha=0.25)
  with pytest.raises(ValueError, match="nested channel dropout"):
    tokenizer_lib.check_model_config(bad.model)
  for temperature in (0.0, -1.0):
    bad = _config()
    bad.model.dynamic.temperature = temperature
    with pytest.raises(ValueError, match=r"dynamic.temperature .* must be"
                       rf" > 0, got {temperature}"):
      tokenizer_lib.Tokenizer(bad.model, rngs=nnx.Rngs(0))


def test_dq_vae_tokens_are_valid_dq_transformer_sequences():
  model = tokenizer_lib.Tokenizer(_config().model, rngs=nnx.Rngs(0))
  images = jax.random.uniform(jax.random.key(2), (6, 32, 32, 3), minval=-1)
  images = images.at[:3].multiply(0.0)  # flat images: mostly coarse
  tokens = model.encode(images)
  dq.check_sequences(np.asarray(tokens.positions), np.asarray(tokens.lengths),
                     model.quantizer.num_regions)
  assert len(set(np.asarray(tokens.lengths).tolist())) > 1


@pytest.mark.slow
def test_dynamic_tokenizer_trains_sharded_resumes_exactly_and_exports(
    tmp_path):
  config = tiny_config("tiny,dynamic")  # 8 x 8 grid: 16 regions, 8 devices
  full = tokenizer_trainer.train_and_evaluate(config, str(tmp_path / "full"))
  assert 0 < full.eval["eval/codebook_usage"] <= 1
  assert 16 <= full.eval["eval/tokens"] <= 64  # R..4R codes per image
  config.run_steps = 2
  tokenizer_trainer.train_and_evaluate(config, str(tmp_path / "cut"))
  config.run_steps = 0
  resumed = tokenizer_trainer.train_and_evaluate(config, str(tmp_path / "cut"))
  for step in (3, 4):
    for name in ("train/loss", "train/fine_share"):
      np.testing.assert_allclose(resumed.train[step][name],
                                 full.train[step][name], rtol=1e-6)
  loaded = export.load_tokenizer(
      export.export(str(tmp_path / "full"), str(tmp_path / "export")))
  batch = next(iter(image_data.eval_dataset(config)))["image"]
  tokens = loaded.encode(batch)
  assert isinstance(tokens, dynamic.DynamicTokens)
  np.testing.assert_allclose(loaded.decode(tokens),
                             loaded(batch).reconstructions, atol=1e-5)
  # train_dq's class-conditional toy runs on the export and samples images
  # (its learning is tested in dq_transformer_test).
  out = tmp_path / "dq"
  result = train_dq.run(str(tmp_path / "export"), str(out), steps=3,
                        crops=4, num_classes=2, samples=2, temperature=1.0)
  assert np.isfinite(result["last_loss"])
  assert 16 <= result["sample_mean_length"] <= 64
  grid = np.asarray(Image.open(out / "samples.png"))
  assert grid.shape[:2] == (2 * 96 + 2, 3 * 96 + 4) and grid.std() > 5


@pytest.mark.slow
def test_three_level_tokenizer_trains_exports_evaluates_and_generates(
    tmp_path):
  """dynamic=3 end to end: training (the eval thresholds calibrated by the
  loop), export, `python -m cvqcar.evaluate`'s fine and medium shares
  beside their targets, and the DQ-Transformer on its sequences."""
  from cvqcar.tokenizer import eval_job

  config = tiny_config("tiny,dynamic=3")  # 8 x 8 grid: 4 regions of 4 x 4
  assert config.model.dynamic.levels == 3
  config.num_train_steps = 4
  summary = tokenizer_trainer.train_and_evaluate(config, str(tmp_path / "w"))
  assert 4 <= summary.eval["eval/tokens"] <= 64  # R..16R codes an image
  assert "eval/medium_share" in summary.eval
  out = export.export(str(tmp_path / "w"), str(tmp_path / "export"))
  loaded = export.load_tokenizer(out)
  assert (loaded.quantizer.levels, loaded.quantizer.num_regions) == (3, 4)
  tau = loaded.quantizer.eval_threshold[...]
  assert tau.shape == (2,) and np.all(np.isfinite(tau))  # calibrated
  result = eval_job.evaluate_export(out, out=str(tmp_path / "eval"),
                                    batch_size=8, num_images=16)
  assert result["fine_share_target"] == result["medium_share_target"] == 0.3
  assert 0 <= result["fine_share"] + result["medium_share"] <= 1
  table = (tmp_path / "eval" / "metrics.md").read_text()
  assert "medium share (target)" in table and "(0.30)" in table
  batch = next(iter(image_data.eval_dataset(config)))["image"]
  tokens = loaded.encode(batch)
  np.testing.assert_allclose(loaded.decode(tokens),
                             loaded(batch).reconstructions, atol=1e-5)
  result = train_dq.run(out, str(tmp_path / "dq"), steps=3, crops=4,
                        num_classes=2, samples=2, temperature=1.0)
  assert np.isfinite(result["last_loss"])
  assert 4 <= result["sample_mean_length"] <= 64


@pytest.mark.slow
def test_dq_transformer_trains_sharded_and_resumes_exactly(tmp_path):
  """The prompt-conditioned DQ-Transformer on the trainer machinery: sharded
  over 4 x 2 devices, checkpointed with its data iterator, resumed exactly,
  on an (untrained) DQ-VAE export."""
  tok_config, config = tiny_dq_transformer_config(tmp_path)
  config.mesh.update(data=4, fsdp=2)
  config.update(batch_size=8, num_train_steps=4, log_every=1,
                eval_every=1000, checkpoint_every=2)
  config.data.num_eval_examples = 5  # a padded, masked batch of 8
  config.sample.update(prompts=("a ginger tabby cat",), per_prompt=2)
  full = dq_trainer.train_and_evaluate(config, str(tmp_path / "dqt"))
  assert full.eval["eval/examples"] == 5
  assert 16 <= full.eval["eval/sample_tokens"] <= 64
  assert np.isfinite(full.eval["eval/loss"])
  assert (tmp_path / "dqt" / "images" / "samples_0000004.png").exists()
  config.run_steps = 2
  dq_trainer.train_and_evaluate(config, str(tmp_path / "dqt_cut"))
  config.run_steps = 0
  resumed = dq_trainer.train_and_evaluate(config, str(tmp_path / "dqt_cut"))
  assert sorted(resumed.train) == [3, 4]
  for step in (3, 4):
    for name in ("train/loss", "train/grad_norm"):
      np.testing.assert_allclose(resumed.train[step][name],
                                 full.train[step][name], rtol=1e-5)
  # The params-only export loads back the trained weights and samples.
  from cvqcar.dq import export as dq_export  # noqa: PLC0415

  out = dq_export.export_dq(str(tmp_path / "dqt"), str(tmp_path / "dq_out"))
  loaded, saved = dq_export.load_dq(out)
  trained, _ = dq_export.restore_params(str(tmp_path / "dqt"))
  fresh = nnx.state(dq.DQTransformer(dq_export.model_config(saved),
                                     rngs=nnx.Rngs(config.seed)))
  for a, b in zip(jax.tree.leaves(nnx.state(loaded)),
                  jax.tree.leaves(trained), strict=True):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert any(not np.array_equal(np.asarray(a), np.asarray(f)) for a, f in
             zip(jax.tree.leaves(trained), jax.tree.leaves(fresh),
                 strict=True))
  assert (tmp_path / "dq_out" / "tokenizer_export.json").exists()
  config.model.width = 64
  with pytest.raises(ValueError, match="model.width"):
    dq_trainer.train_and_evaluate(config, str(tmp_path / "dqt"))
  # The DQ-VAE re-exported from another seed: the workdir refuses it.
  config.model.width = 32
  model = tokenizer_lib.Tokenizer(tok_config.model, rngs=nnx.Rngs(1))
  _, params, buffers = nnx.split(model, nnx.Param, ...)
  checkpoint.save_export(str(tmp_path / "export"), tok_config,
                         {"params": params, "buffers": buffers},
                         overwrite=True)
  with pytest.raises(ValueError, match=r"the workdir .*dqt was made with the"
                     r" tokenizer export .*export \(sha256 [0-9a-f]{12}"):
    dq_trainer.train_and_evaluate(config, str(tmp_path / "dqt"))


def test_coarse_codes_come_from_the_deeper_stage():
  """With the dual-grain encoder a coarse region is coded from the coarse
  features: changing them changes coarse regions only."""
  model = tokenizer_lib.Tokenizer(_config().model, rngs=nnx.Rngs(0))
  images = jax.random.uniform(jax.random.key(3), (2, 32, 32, 3), minval=-1)
  fine, coarse = model.encoder(images)
  q = model.quantizer
  # Half the regions coarse: the eval threshold at the median logit.
  q.eval_threshold[...] = jnp.median(q.scores(fine))
  a = q(fine, coarse_bhwc=coarse)
  b = q(fine, coarse_bhwc=coarse + 3.0)
  coarse_br = a.fine_gate < 0.5
  assert bool(jnp.any(coarse_br)) and bool(jnp.any(~coarse_br))
  changed = jnp.any(dynamic.to_regions(a.vq.quantized)
                    != dynamic.to_regions(b.vq.quantized), axis=(2, 3))
  np.testing.assert_array_equal(np.asarray(changed & ~coarse_br), False)
  assert bool(jnp.all(changed | ~coarse_br))
  with pytest.raises(ValueError, match="needs coarse features"):
    q(fine)


def test_attention_block_matches_its_formula():
  from cvqcar.tokenizer import vqgan

  block = vqgan.AttnBlock(8, 4, rngs=nnx.Rngs(0))
  x = jax.random.normal(jax.random.key(0), (2, 3, 3, 8))
  y = block.norm(x).reshape(2, 9, 8)
  lin = lambda conv: (y @ conv.kernel[...].reshape(8, 8) + conv.bias[...])
  q, k, v = lin(block.q), lin(block.k), lin(block.v)
  w = jax.nn.softmax(q @ jnp.swapaxes(k, 1, 2) / np.sqrt(8), axis=-1)
  out = (w @ v) @ block.out.kernel[...].reshape(8, 8) + block.out.bias[...]
  np.testing.assert_allclose(np.asarray(block(x)),
                             np.asarray(x + out.reshape(2, 3, 3, 8)),
                             atol=1e-5)


def test_patch_entropy_matches_the_originals_formula():
  rng = np.random.default_rng(0)
  images = rng.uniform(-1, 1, (2, 8, 8, 3)).astype(np.float32)
  images[0, :4, :4] = 0.2  # a flat region: one grey level
  got = np.asarray(dynamic.patch_entropy(jnp.asarray(images), 2))
  grey = ((images + 1) / 2) @ np.array([0.2989, 0.5870, 0.1140])
  bins = np.linspace(0, 1, 32)
  for b in range(2):
    for i in range(2):
      for j in range(2):
        v = grey[b, 4 * i:4 * i + 4, 4 * j:4 * j + 4].reshape(-1)
        pdf = np.exp(-0.5 * ((v[:, None] - bins) / 0.01) ** 2).mean(0)
        pdf = pdf / (pdf.sum() + 1e-40) + 1e-40
        np.testing.assert_allclose(got[b, 2 * i + j],
                                   -np.sum(pdf * np.log(pdf)), rtol=1e-4,
                                   atol=1e-5)
  assert got[0, 0] < 1.0 < 2.0 < got[0, 1]  # flat vs uniform noise


@pytest.mark.parametrize("target", [0.25, 0.75])
def test_entropy_router_codes_the_target_share_of_its_batch(target):
  config = _config()
  config.model.dynamic.router = "entropy"
  config.model.dynamic.fine_fraction = target
  config.model.dynamic.calibration_decay = 0.0
  model = tokenizer_lib.Tokenizer(config.model, rngs=nnx.Rngs(0))
  photos = image_data.embedded_photos("train")
  crops = np.stack([np.asarray(p["image"][:32, :32], np.float32) / 127.5 - 1
                    for p in photos[:8]])
  # A little noise: no two regions of equal entropy at the threshold.
  noise = np.random.default_rng(0).uniform(-1e-3, 1e-3, crops.shape)
  images = jnp.asarray(np.clip(crops + noise, -1, 1), jnp.float32)
  out = model(images, train=True, key=jax.random.key(0))
  assert float(out.fine_share) == target  # exact on the training batch
  assert float(out.budget_loss) == 0.0
  # Calibrated on that batch, encode codes the same share of it fine.
  model.calibrate(images)
  tokens = model.encode(images)
  share = float(jnp.mean((tokens.lengths / 16 - 1) / 3))
  assert abs(share - target) <= 1 / (8 * 16)
  with pytest.raises(ValueError, match="dynamic.router must be one of"):
    dynamic.DynamicQuantizer(32, 6, 4, 4, router="random", rngs=nnx.Rngs(0))
