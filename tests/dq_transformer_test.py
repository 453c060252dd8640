"""DQ-Transformer: sequence format, causality, valid sampling, training."""

import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

from cvqcar.car import model as car_lib
from cvqcar.dq import trainer as dq_trainer
from cvqcar.dq import transformer as dq

CONFIG = dq.DQConfig(grid=4, num_codes=32, num_classes=4)
R, END, L = CONFIG.num_regions, CONFIG.end, CONFIG.max_len  # 4, 20, 16


def assert_valid(positions, length, num_regions):
  """The format's definition, written independently of the module."""
  end = 5 * num_regions
  positions = [int(p) for p in positions]
  seq, pad = positions[:length], positions[length:]
  assert all(p == end for p in pad), positions
  assert all(0 <= p < end for p in seq), positions
  # Coarse ids (< R) before fine ones, each phase ascending: ids ascend.
  assert all(a < b for a, b in zip(seq, seq[1:], strict=False)), positions
  for r in range(num_regions):
    cells = {num_regions + 4 * r + k for k in range(4)}
    coarse = r in seq
    fine = cells & set(seq)
    assert (coarse and not fine) or (not coarse and fine == cells), (
        r, positions)


@pytest.fixture(scope="module")
def model():
  return dq.DQTransformer(CONFIG, rngs=nnx.Rngs(0))


@pytest.fixture(scope="module")
def forward(model):
  graphdef, state = nnx.split(model)
  call = jax.jit(lambda state, *args: nnx.merge(graphdef, state)(*args))
  return functools.partial(call, state)  # (class_ids, codes, positions)


def test_dq_positions_orders_coarse_then_fine_cells():
  fine = np.array([[0, 0, 0, 0], [1, 1, 1, 1], [1, 0, 1, 0], [0, 1, 1, 0]],
                  bool)
  positions, lengths = dq.dq_positions(fine)
  pad = lambda seq: seq + [END] * (L - len(seq))
  want = [pad([0, 1, 2, 3]),
          pad(list(range(4, 20))),
          pad([1, 3, 4, 5, 6, 7, 12, 13, 14, 15]),
          pad([0, 3, 8, 9, 10, 11, 12, 13, 14, 15])]
  np.testing.assert_array_equal(positions, want)
  np.testing.assert_array_equal(lengths, [4, 16, 10, 10])
  # s = 6: R = 9, END = 45; region 4 (the centre) fine.
  positions, lengths = dq.dq_positions(np.eye(9, dtype=bool)[4:5])
  assert positions.shape == (1, 36) and int(lengths[0]) == 12
  np.testing.assert_array_equal(
      positions[0, :13], [0, 1, 2, 3, 5, 6, 7, 8, 25, 26, 27, 28, 45])
  assert (positions[0, 12:] == 45).all()


def test_masks_allow_every_real_sequence_and_force_the_fine_phase():
  fine = jax.random.bernoulli(jax.random.key(0), 0.5, (64, R))
  positions, lengths = dq.dq_positions(fine)
  for row, n in zip(np.asarray(positions), np.asarray(lengths), strict=True):
    assert_valid(row, n, R)
  dq.check_sequences(positions, lengths, R)
  allowed = np.asarray(dq.valid_next_positions(positions, R))  # [B, L+1, P]
  targets = np.concatenate([positions, np.full((64, 1), END)], 1)
  assert np.take_along_axis(allowed, targets[..., None], -1).all()
  # The first choice: any coarse region or the first fine cell.
  np.testing.assert_array_equal(np.flatnonzero(allowed[0, 0]), [0, 1, 2, 3, 4])
  # Once a fine id is in the prefix, the next id is forced.
  prev = np.concatenate([np.full((64, 1), -1), positions], 1)
  assert (allowed.sum(-1)[prev >= R] == 1).all()


def test_check_sequences_names_an_invalid_row():
  positions, lengths = dq.dq_positions(np.zeros((2, R), bool))
  bad = positions.at[1, 3].set(2)  # region 2 twice, region 3 missing
  with pytest.raises(ValueError, match="row 1"):
    dq.check_sequences(bad, lengths, R)
  with pytest.raises(ValueError, match="row 0"):
    dq.check_sequences(positions, lengths + 1, R)
  with pytest.raises(ValueError, match=r"expected \[B, R\]"):
    dq.dq_positions(np.zeros(R, bool))


def test_changing_step_t_never_changes_earlier_logits(forward):
  key1, key2 = jax.random.split(jax.random.key(1))
  classes = jnp.array([0, 3])
  codes = jax.random.randint(key1, (2, L), 0, CONFIG.num_codes)
  positions = jax.random.randint(key2, (2, L), 0, END + 1)
  base_pos, base_code = forward(classes, codes, positions)
  assert base_pos.shape == (2, L + 1, END + 1)
  assert base_code.shape == (2, L, CONFIG.num_codes)
  changed = lambda a, b: float(jnp.abs(a - b).max()) > 1e-4
  for t in range(L):
    # Step t predicts p_t from tokens < t, and c_t from those and p_t.
    new_code = (codes[:, t] + 1) % CONFIG.num_codes
    pos, code = forward(classes, codes.at[:, t].set(new_code), positions)
    np.testing.assert_allclose(pos[:, :t + 1], base_pos[:, :t + 1], atol=1e-5)
    np.testing.assert_allclose(code[:, :t + 1], base_code[:, :t + 1],
                               atol=1e-5)
    assert changed(pos[:, t + 1:], base_pos[:, t + 1:])
    new_pos = (positions[:, t] + 1) % (END + 1)
    pos, code = forward(classes, codes, positions.at[:, t].set(new_pos))
    np.testing.assert_allclose(pos[:, :t + 1], base_pos[:, :t + 1], atol=1e-5)
    np.testing.assert_allclose(code[:, :t], base_code[:, :t], atol=1e-5)
    assert changed(code[:, t], base_code[:, t])
    assert changed(pos[:, t + 1:], base_pos[:, t + 1:])


@pytest.mark.parametrize("cfg_scale", [1.0, 3.0])
def test_sampled_sequences_are_valid(model, cfg_scale):
  classes = jnp.arange(48) % (CONFIG.num_classes + 1)
  codes, positions, lengths = dq.generate(
      model, classes, jax.random.key(2), temperature=1.0, top_p=0.95,
      cfg_scale=cfg_scale)
  codes, positions, lengths = map(np.asarray, (codes, positions, lengths))
  for row, n in zip(positions, lengths, strict=True):
    assert_valid(row, n, R)
  pad = np.arange(L)[None] >= lengths[:, None]
  assert (codes[pad] == 0).all() and (codes < CONFIG.num_codes).all()
  # Not vacuous: the samples mix coarse and fine codings.
  assert len(set(lengths.tolist())) >= 3


def masked_greedy_targets(pos_logits, code_logits, positions):
  allowed = dq.valid_next_positions(positions, R)
  return (np.asarray(jnp.argmax(dq.mask_logits(pos_logits, allowed), -1)),
          np.asarray(jnp.argmax(code_logits, -1)))


@pytest.mark.parametrize("cfg_scale", [1.0, 3.0])
def test_greedy_samples_are_argmax_of_guided_teacher_forced_logits(
    model, forward, cfg_scale):
  classes = jnp.arange(4)
  codes, positions, lengths = dq.generate(
      model, classes, jax.random.key(3), temperature=0.0,
      cfg_scale=cfg_scale)
  pos_c, code_c = forward(classes, codes, positions)
  null = jnp.full_like(classes, CONFIG.null_class)
  pos_u, code_u = forward(null, codes, positions)
  pos_want, code_want = masked_greedy_targets(
      car_lib.guided_logits(pos_c, pos_u, cfg_scale),
      car_lib.guided_logits(code_c, code_u, cfg_scale), positions)
  for i, n in enumerate(np.asarray(lengths)):
    np.testing.assert_array_equal(positions[i, :n], pos_want[i, :n])
    assert pos_want[i, n] == END  # END is the argmax at step L
    np.testing.assert_array_equal(codes[i, :n], code_want[i, :n])


def test_cfg_scale_zero_is_the_null_class_and_top_k_one_is_greedy(model):
  classes = jnp.arange(4)
  key = jax.random.key(4)
  unguided = dq.generate(model, classes, key, temperature=0.0,
                         cfg_scale=0.0)
  null = dq.generate(model, jnp.full_like(classes, CONFIG.null_class), key,
                     temperature=0.0)
  for a, b in zip(unguided, null, strict=True):
    np.testing.assert_array_equal(a, b)
  greedy = dq.generate(model, classes, key, temperature=0.0)
  top1 = dq.generate(model, classes, key, temperature=1.0, top_k=1)
  for a, b in zip(greedy, top1, strict=True):
    np.testing.assert_array_equal(a, b)
  with pytest.raises(ValueError, match="top_k"):
    dq.generate(model, classes, key, top_k=CONFIG.num_codes + 1)
  with pytest.raises(ValueError, match="null class"):
    dq.generate(model, classes + CONFIG.num_classes, key)


TEXT = dq.DQConfig(grid=4, num_codes=32, text_vocab=40, max_text_len=6)


def test_free_fine_positions_cover_every_fine_cell_once(model):
  """The model may order the fine cells itself: the coarse ids still come
  first and ascending, then each cell of every non-coarse region exactly
  once in some order, then END; cached and full recompute agree."""
  classes = jnp.arange(24) % CONFIG.num_classes
  key = jax.random.key(5)
  out = dq.generate(model, classes, key, temperature=1.0, free_positions=True)
  full = dq.generate(model, classes, key, temperature=1.0,
                     free_positions=True, use_cache=False)
  for a, b in zip(out, full, strict=True):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  reordered = 0
  for row, n in zip(np.asarray(out[1]), np.asarray(out[2]), strict=True):
    coarse = [p for p in row[:n] if p < R]
    assert coarse == sorted(coarse) and row[:len(coarse)].tolist() == coarse
    fine = row[len(coarse):n]
    want = {R + 4 * r + k for r in range(R) if r not in coarse
            for k in range(4)}
    assert sorted(fine.tolist()) == sorted(want)
    assert (row[n:] == END).all()
    reordered += fine.tolist() != sorted(fine.tolist())
  assert reordered > 0  # not the fixed order in disguise


@pytest.mark.parametrize("cfg_scale", [1.0, 3.0])
def test_cached_sampling_equals_full_recompute(model, cfg_scale):
  """Both streams' KV caches give the tokens of recomputing every step, at
  temperature 1 (the same draws from the same logits), for classes and
  for left-padded prompts."""
  settings = dict(temperature=1.0, top_p=0.9, cfg_scale=cfg_scale,
                  position_temperature=0.7, position_top_k=5)
  classes = jnp.arange(6) % (CONFIG.num_classes + 1)
  text_model = dq.DQTransformer(TEXT, rngs=nnx.Rngs(1))
  for m, cond in ((model, classes),
                  (text_model, prompts([[5, 6, 7], [9], []], 4))):
    key = jax.random.key(7)
    cached = dq.generate(m, cond, key, **settings)
    full = dq.generate(m, cond, key, use_cache=False, **settings)
    for a, b in zip(cached, full, strict=True):
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert len(set(np.asarray(cached[2]).tolist())) >= 2  # not all alike


def prompts(rows, length):
  """Left-padded (ids, mask) [B, length] of the given prompts."""
  ids = np.zeros((len(rows), length), np.int32)
  mask = np.zeros((len(rows), length), np.int32)
  for i, row in enumerate(rows):
    if row:
      ids[i, -len(row):], mask[i, -len(row):] = row, 1
  return jnp.asarray(ids), jnp.asarray(mask)


def test_prompt_conditioning_is_causal_padding_blind_and_guided():
  model = dq.DQTransformer(TEXT, rngs=nnx.Rngs(1))
  graphdef, state = nnx.split(model)
  forward = jax.jit(lambda cond, c, p: nnx.merge(graphdef, state)(cond, c, p))
  key1, key2 = jax.random.split(jax.random.key(2))
  codes = jax.random.randint(key1, (2, L), 0, TEXT.num_codes)
  positions = jax.random.randint(key2, (2, L), 0, END + 1)
  cond = prompts([[5, 6, 7], [9]], 4)
  base_pos, base_code = forward(cond, codes, positions)
  assert base_pos.shape == (2, L + 1, END + 1)
  # More left padding changes nothing; another prompt changes everything.
  pos, code = forward(prompts([[5, 6, 7], [9]], 6), codes, positions)
  np.testing.assert_allclose(pos, base_pos, atol=1e-5)
  np.testing.assert_allclose(code, base_code, atol=1e-5)
  pos, _ = forward(prompts([[5, 6, 8], [9]], 4), codes, positions)
  assert float(jnp.abs(pos[0, 0] - base_pos[0, 0]).max()) > 1e-4
  np.testing.assert_allclose(pos[1], base_pos[1], atol=1e-5)
  # Causal behind a prompt too.
  for t in (0, L // 2, L - 1):
    new = codes.at[:, t].set((codes[:, t] + 1) % TEXT.num_codes)
    pos, code = forward(cond, new, positions)
    np.testing.assert_allclose(pos[:, :t + 1], base_pos[:, :t + 1], atol=1e-5)
    np.testing.assert_allclose(code[:, :t + 1], base_code[:, :t + 1],
                               atol=1e-5)
  # Guidance's null rows are the empty prompt; samples stay valid.
  key = jax.random.key(3)
  unguided = dq.generate(model, cond, key, temperature=0.0, cfg_scale=0.0)
  empty = dq.generate(model, prompts([[], []], 4), key, temperature=0.0)
  for a, b in zip(unguided, empty, strict=True):
    np.testing.assert_array_equal(a, b)
  codes, positions, lengths = dq.generate(model, cond, key, cfg_scale=3.0)
  for row, n in zip(np.asarray(positions), np.asarray(lengths), strict=True):
    assert_valid(row, n, R)
  with pytest.raises(ValueError, match="at most max_text_len = 6"):
    dq.generate(model, prompts([[1]], 7), key)
  with pytest.raises(ValueError, match="text ids, text mask"):
    dq.generate(model, jnp.arange(2), key)


@pytest.mark.slow
def test_training_memorises_sequences_per_class():
  fine = np.array([[0, 0, 0, 0], [1, 0, 1, 0], [0, 1, 1, 0], [1, 1, 1, 1]],
                  bool)
  positions, lengths = map(np.asarray, dq.dq_positions(fine))
  codes = np.random.default_rng(0).integers(0, CONFIG.num_codes,
                                           positions.shape)
  codes = np.where(positions == END, 0, codes)
  config = ml_collections.ConfigDict({
      "model": {"grid": 4, "num_codes": 32, "num_classes": 4},  # CONFIG
      "optimizer": {"learning_rate": 3e-3, "warmup_steps": 10, "b1": 0.9,
                    "b2": 0.99, "weight_decay": 0.0, "grad_clip": 1.0},
      "batch_size": 4, "seed": 0, "cond_drop_prob": 0.0})
  trained, losses = dq_trainer.train(config, codes, positions, lengths,
                             np.arange(4), steps=60)
  assert losses.shape == (60,) and np.isfinite(losses).all()
  assert losses[-10:].mean() < 0.1 * losses[:5].mean(), losses[::10]
  out_codes, out_pos, out_len = dq.generate(
      trained, jnp.arange(4), jax.random.key(5), temperature=0.0)
  np.testing.assert_array_equal(out_pos, positions)
  np.testing.assert_array_equal(out_len, lengths)
  assert (np.asarray(out_codes) == codes).mean() > 0.9


THREE = dq.DQConfig(grid=8, levels=3, num_codes=32, num_classes=4)


def assert_valid_levels(positions, length, num_regions, levels, free=False):
  """The L-level format's definition, written independently of the module:
  every region once, at one level, all its 4^g cells; ids ascending (with
  `free`, the finest level's cells in any order after the rest)."""
  offsets = np.cumsum([0] + [num_regions * 4 ** g for g in range(levels)])
  end = offsets[-1]
  positions = [int(p) for p in positions]
  seq, pad = positions[:length], positions[length:]
  assert all(p == end for p in pad) and all(0 <= p < end for p in seq)
  assert len(set(seq)) == len(seq)
  cells = {}
  for p in seq:
    g = int(np.searchsorted(offsets, p, side="right")) - 1
    r, k = divmod(p - offsets[g], 4 ** g)
    cells.setdefault(r, set()).add((g, k))
  assert sorted(cells) == list(range(num_regions)), positions
  for got in cells.values():
    g = {lvl for lvl, _ in got}
    assert len(g) == 1 and len(got) == 4 ** g.pop(), positions
  finest = offsets[-2]
  head = [p for p in seq if p < finest]
  assert seq[:len(head)] == sorted(head), positions
  tail = seq[len(head):]
  assert all(p >= finest for p in tail)
  if not free:
    assert tail == sorted(tail), positions


def test_three_level_masks_accept_real_sequences_and_sampling_stays_valid():
  from cvqcar.tokenizer import dynamic

  r = THREE.num_regions  # 4 regions of 4 x 4 cells; T = 64, END = 84
  assert (r, THREE.max_len, THREE.end) == (4, 64, 84)
  rng = np.random.default_rng(0)
  level = jnp.asarray(rng.integers(0, 3, (32, r)))
  codes = [jnp.zeros((32, r, 4 ** g), jnp.int32) for g in range(3)]
  tokens = dynamic.sequence_levels(codes, level)
  dq.check_sequences(tokens.positions, tokens.lengths, r, levels=3)
  for row, n in zip(np.asarray(tokens.positions), np.asarray(tokens.lengths),
                    strict=True):
    assert_valid_levels(row, n, r, 3)
  swapped = np.asarray(tokens.positions).copy()
  i = int(np.argmax(np.asarray(tokens.lengths) > 2))
  swapped[i, [0, 1]] = swapped[i, [1, 0]]
  with pytest.raises(ValueError, match="row 0 is not a valid DQ sequence"):
    dq.check_sequences(swapped[i:i + 1], tokens.lengths[i:i + 1], r,
                       levels=3)
  model = dq.DQTransformer(THREE, rngs=nnx.Rngs(0))
  classes = jnp.arange(16) % THREE.num_classes
  for free in (False, True):
    key = jax.random.key(9)
    cached = dq.generate(model, classes, key, temperature=1.0,
                         free_positions=free)
    full = dq.generate(model, classes, key, temperature=1.0,
                       free_positions=free, use_cache=False)
    for a, b in zip(cached, full, strict=True):
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    positions, lengths = np.asarray(cached[1]), np.asarray(cached[2])
    for row, n in zip(positions, lengths, strict=True):
      assert_valid_levels(row, n, r, 3, free=free)
    # Not vacuous: all three levels are sampled.
    used = {int(np.searchsorted([4, 20, 84], p, side="right"))
            for p in positions[positions < THREE.end]}
    assert used == {0, 1, 2}, used


def test_sharded_sampler_draws_the_same_samples_on_any_mesh(model,
                                                             tmp_path):
  """DQSampler (the CAR sampler's mesh, per-row keys): the same sequences
  on one device and on data x fsdp meshes, with odd batches padded, equal
  to generate's with those keys; a row does not depend on the others; and
  a params-only export loads onto a mesh with the same result."""
  from configs import dq_transformer
  from cvqcar import checkpoint
  from cvqcar.car import sampling
  from cvqcar.dq import sampler as dq_sampler

  config = ml_collections.ConfigDict({
      "model": dict(CONFIG.__dict__),
      "logical_axis_rules": dq_transformer.get_config(
          "tiny").logical_axis_rules})
  classes = jnp.arange(7) % (CONFIG.num_classes + 1)
  keys = sampling.sample_keys(3, np.arange(7), np.zeros(7))
  settings = dict(temperature=1.0, cfg_scale=2.0, position_top_p=0.9)
  want = dq.generate(model, classes, keys, **settings)
  for mesh in ("data=1", "data=2,fsdp=2", "fsdp=4"):
    s = dq_sampler.DQSampler.from_model(model, config, mesh=mesh)
    got = s.sample(classes, keys, **settings)
    for a, b in zip(got, want, strict=True):
      np.testing.assert_array_equal(a, np.asarray(b), err_msg=mesh)
  alone = s.sample(classes[2:3], keys[2:3], **settings)
  for a, b in zip(alone, want, strict=True):
    np.testing.assert_array_equal(a[0], np.asarray(b)[2])
  _, params = nnx.split(model)
  checkpoint.save_export(str(tmp_path / "dqt"), config, {"params": params})
  loaded = dq_sampler.DQSampler.load(str(tmp_path / "dqt"), mesh="data=2")
  for a, b in zip(loaded.sample(classes, keys, **settings), want,
                  strict=True):
    np.testing.assert_array_equal(a, np.asarray(b))
  # Per-row keys: another row's key changes only that row.
  other = dq.generate(model, classes, keys.at[0].set(jax.random.key(99)),
                      **settings)
  for a, b in zip(other, want, strict=True):
    np.testing.assert_array_equal(np.asarray(a)[1:], np.asarray(b)[1:])


def test_eval_counts_every_example_once(tmp_path, monkeypatch):
  """An eval set smaller than a batch: padded and masked, not dropped; the
  metrics are the mean over the real rows of each row's own."""
  from conftest import tiny_dq_transformer_config  # noqa: PLC0415
  from cvqcar import sharding  # noqa: PLC0415
  from cvqcar.data import pairs  # noqa: PLC0415

  _, config = tiny_dq_transformer_config(tmp_path)
  config.update(batch_size=16, num_train_steps=0)
  config.data.num_eval_examples = 8
  # (dynamic_test runs train_and_evaluate on a padded eval set.) Codes are
  # fixed here: an untrained DQ-VAE's nearest codes tie differently per mesh.
  config, tokenizer, text_tok = dq_trainer.prepare(config)
  model_cfg = dq_trainer._model_config(config)
  mesh = sharding.make_mesh(config)
  (batch,) = pairs.padded_eval_batches(config, text_tok)
  batch.pop("corrupt")
  real = batch["mask"] > 0
  assert real.sum() == 8 and len(real) == 16
  tokens = jax.jit(tokenizer.encode)(batch["image"])._asdict()
  tokens = {k: np.array(v) for k, v in tokens.items()}
  for v in tokens.values():  # padding rows: other (valid) sequences
    v[~real] = v[real][::-1]
  monkeypatch.setattr(dq_trainer, "_encoded",
                      lambda batch, *_: {**batch, **tokens})
  graphdef, params = nnx.split(dq.DQTransformer(model_cfg,
                                                rngs=nnx.Rngs(1)))
  eval_metrics = dq_trainer.make_eval_metrics(graphdef, None, model_cfg, mesh)
  got = eval_metrics(params, None, [dict(batch)])
  loss = jax.jit(lambda params, text, mask, codes, positions, lengths:
                 dq.loss_fn(nnx.merge(graphdef, params), (text, mask), codes,
                            positions, lengths)[1])
  rows = [loss(params, batch["text"][i:i + 1], batch["text_mask"][i:i + 1],
               *(tokens[k][i:i + 1] for k in ("codes", "positions",
                                              "lengths")))
          for i in np.flatnonzero(real)]
  assert got["examples"] == 8
  for k in rows[0]:
    np.testing.assert_allclose(got[k], np.mean([r[k] for r in rows]),
                               rtol=1e-5)
