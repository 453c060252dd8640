"""DQ-Transformer training: prompt-conditioned, sharded and resumable.

  python -m cvqcar.train \
      --config=configs/cvq_tokenizer.py:tiny,budget=64,dynamic \
      --workdir=runs/dq_tiny
  python -m cvqcar.export --workdir=runs/dq_tiny --out=exports/dq_tiny
  python -m cvqcar.train --config=configs/dq_transformer.py:tiny \
      --workdir=runs/dqt_tiny

`train_and_evaluate` is what `python -m cvqcar.train` runs for
config.trainer = 'dq', on CAR's machinery: text-image pairs stream from
Grain, the frozen DQ-VAE export encodes each batch inside the jitted step,
the state is created sharded over config.mesh by its logical axes, and a
checkpoint holds the state with the data iterator, so a run resumes exactly
(cvqcar.loop). Samples of config.sample.prompts are decoded
into WORKDIR/images at each evaluation.

`train` is the single-device loop over pre-encoded arrays behind
cvqcar.train_dq's class-conditioned toy.
"""

from __future__ import annotations

import functools
import logging
import os
import time
from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx

from cvqcar import fingerprint, loop, optim, sharding, visualize
from cvqcar.car import sampling
from cvqcar.car import state as car_state
from cvqcar.data import pairs, text
from cvqcar.dq import transformer as dq
from cvqcar.tokenizer import dynamic, export

# What must match between a workdir and the config that resumes it.
SECTIONS = ("tokenizer", "model", "text_tokenizer")


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: nnx.State
  opt_state: Any

  def saved(self) -> TrainState:
    return self


def train_step(state: TrainState, batch, key, *, graphdef, tx,
               cond_drop_prob: float):
  """One AdamW update on a batch dict of codes, positions [B, 4R], lengths
  [B] and the condition: class_ids [B], or text and text_mask [B, L]. A
  cond_drop_prob share of rows is made unconditional (classifier-free
  guidance training)."""
  model = nnx.merge(graphdef, state.params)
  key = jax.random.fold_in(key, state.step)
  drop_b = jax.random.uniform(key, batch["lengths"].shape) < cond_drop_prob
  cond = dq.drop_condition(model.config, condition(model.config, batch),
                           drop_b)

  def f(params):
    return dq.loss_fn(nnx.merge(graphdef, params), cond, batch["codes"],
                      batch["positions"], batch["lengths"])

  (_, metrics), grads = jax.value_and_grad(f, has_aux=True)(state.params)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  metrics["grad_norm"] = optax.tree.norm(grads)
  return state.replace(step=state.step + 1, params=params,
                       opt_state=opt_state), metrics


def condition(config: dq.DQConfig, batch):
  """The batch's condition in the model's form."""
  if config.text_vocab:
    return batch["text"], batch["text_mask"]
  return batch["class_ids"]


def _encoded(batch, tok_graphdef, tok_state):
  """The batch with the frozen tokenizer's codes, positions and lengths."""
  tokens = nnx.merge(tok_graphdef, tok_state).encode(batch["image"])
  return {**batch, **tokens._asdict()}


def _model_config(config) -> dq.DQConfig:
  return dq.DQConfig(**config.model.to_dict())


def prepare(config, workdir: str | None = None):
  """(config with the model's grid, K and text vocabulary resolved, the
  frozen DQ-VAE, the text tokenizer); refuses a non-dynamic tokenizer and
  a workdir trained on another tokenizer export (unless
  config.allow_tokenizer_mismatch)."""
  config = ml_collections.ConfigDict(config.to_dict())
  expect = ml_collections.ConfigDict({"model": config.tokenizer})
  tokenizer = export.load_tokenizer(config.tokenizer_export, expect=expect)
  if tokenizer.quantize != "dynamic":
    raise ValueError(f"{config.tokenizer_export} is a"
                     f" {tokenizer.quantize!r} tokenizer; the DQ-Transformer"
                     " needs a DQ-VAE (quantize='dynamic')")
  if workdir is not None:
    fingerprint.check_record(
        workdir, export.tokenizer_record(config.tokenizer_export),
        "the workdir", allow=config.allow_tokenizer_mismatch)
  text_tok = text.load_text_tokenizer(config.text_tokenizer)
  m = config.model
  m.grid = tokenizer.quantizer.height
  m.levels = tokenizer.quantizer.levels
  m.num_codes = tokenizer.num_codes
  m.text_vocab = text_tok.vocab_size
  m.max_text_len = config.max_text_len
  return config, tokenizer, text_tok


def init_state(config, model_cfg: dq.DQConfig, mesh, tx):
  """(graphdef, TrainState, shardings): the state created sharded."""

  def init(key):
    params = nnx.state(dq.DQTransformer(model_cfg, rngs=nnx.Rngs(key)))
    return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                      opt_state=tx.init(params))

  graphdef = nnx.graphdef(nnx.eval_shape(
      lambda: dq.DQTransformer(model_cfg, rngs=nnx.Rngs(0))))
  abstract = jax.eval_shape(init, jax.random.key(config.seed))
  shardings = sharding.state_shardings(abstract, mesh, config)
  state = jax.jit(init, out_shardings=shardings)(jax.random.key(config.seed))
  return graphdef, state, shardings


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str,
                       on_log=None) -> loop.Summary:
  """Trains the DQ-Transformer on text-image pairs encoded by the frozen
  DQ-VAE; resumes from `workdir` if it can (cvqcar.loop)."""
  config, tokenizer, text_tok = prepare(config, workdir)
  model_cfg = _model_config(config)
  mesh = sharding.make_mesh(config)
  tx = optim.make_optimizer(config)
  graphdef, state, shardings = init_state(config, model_cfg, mesh, tx)
  fresh = {"state": state}  # dropped once the loop has a state
  del state
  tok_graphdef, tok_state = nnx.split(tokenizer)
  rep = sharding.replicated(mesh)
  tok_state = jax.device_put(tok_state, rep)

  def step(state, batch, key, tok_state):
    return train_step(state, _encoded(batch, tok_graphdef, tok_state), key,
                      graphdef=graphdef, tx=tx,
                      cond_drop_prob=config.cond_drop_prob)

  step_fn = jax.jit(step, in_shardings=(
      shardings, sharding.batch_sharded(mesh), rep, rep),
                    out_shardings=(shardings, rep), donate_argnums=(0,))

  eval_metrics = make_eval_metrics(graphdef, tok_graphdef, model_cfg, mesh)
  pairs.padded_eval_batches(config, text_tok)  # refuses an empty eval set

  def evaluate(step, state, writer):
    del writer
    t0 = time.time()
    scalars = {f"eval/{k}": v for k, v in eval_metrics(
        state.params, tok_state,
        pairs.padded_eval_batches(config, text_tok)).items()}
    grid, lengths = sample_grid(config, graphdef, state.params,
                                nnx.merge(tok_graphdef, tok_state), text_tok)
    scalars["eval/sample_tokens"] = float(np.mean(lengths))
    path = os.path.join(workdir, "images", f"samples_{step:07d}.png")
    if jax.process_index() == 0:
      visualize.save_png(grid, path)
    logging.info("eval at step %d (%.1fs): loss %.4f, samples of %.1f codes"
                 " on average: %s", step, time.time() - t0,
                 scalars["eval/loss"], scalars["eval/sample_tokens"], path)
    return scalars

  def from_saved(saved):
    fresh.clear()
    return saved

  task = loop.Task(
      what="DQ-Transformer", mesh=mesh, init=lambda: fresh.pop("state"),
      restore_target=car_state.with_shardings(fresh["state"], shardings),
      from_saved=from_saved, step=step_fn,
      step_args=(jax.random.key(config.seed + 1), tok_state),
      evaluate=evaluate,
      train_data=lambda start: pairs.train_dataset(config, text_tok, start),
      sections=SECTIONS,
      # The prompt and the padded code sequence (4R).
      tokens_per_example=config.max_text_len + model_cfg.max_len,
      on_start=lambda: export.write_tokenizer_record(
          workdir, export.tokenizer_record(config.tokenizer_export)))
  return loop.run(config, workdir, task, on_log=on_log)


def row_metrics(model: dq.DQTransformer, cond, codes_bl, positions_bl,
                lengths_b) -> dict[str, jax.Array]:
  """dq.loss_fn's metrics of each row alone: {name: [B]}."""

  def one(cond, codes_l, positions_l, length):
    return dq.loss_fn(model, jax.tree.map(lambda x: x[None], cond),
                      codes_l[None], positions_l[None], length[None])[1]

  return jax.vmap(one)(cond, codes_bl, positions_bl, lengths_b)


def make_eval_metrics(graphdef, tok_graphdef, model_cfg: dq.DQConfig, mesh):
  """eval_metrics(params, tok_state, batches) -> {name: value, 'examples'}:
  each metric the mean over the real rows (batch 'mask') of its value on
  the row alone, each example counted once however the batches pad."""

  @jax.jit
  def sums(params, batch, tok_state):
    batch = _encoded(batch, tok_graphdef, tok_state)
    metrics_b = row_metrics(nnx.merge(graphdef, params),
                            condition(model_cfg, batch), batch["codes"],
                            batch["positions"], batch["lengths"])
    real_b = batch["mask"] > 0
    # where, not a product: a padding row's values are not read at all.
    return {k: jnp.sum(jnp.where(real_b, v, 0.0))
            for k, v in metrics_b.items()}, jnp.sum(real_b)

  def eval_metrics(params, tok_state, batches) -> dict[str, float]:
    totals, count = {}, 0
    for local in batches:
      local.pop("corrupt", None)  # a count of this process's, not a row
      s, n = jax.device_get(sums(params, sharding.global_batch(local, mesh),
                                 tok_state))
      for k, v in s.items():
        totals[k] = totals.get(k, 0.0) + float(v)
      count += int(n)
    if not count:
      raise ValueError("no eval example could be read (all corrupt?)")
    return {**{k: v / count for k, v in totals.items()},
            "examples": float(count)}

  return eval_metrics


def sample_grid(config, graphdef, params, tokenizer, text_tok):
  """One row per config.sample.prompts entry, config.sample.per_prompt
  decoded samples each -> (uint8 grid, sample lengths)."""
  s = config.sample
  prompts = [p for p in s.prompts for _ in range(s.per_prompt)]
  ids, mask = text.batch_encode(text_tok, prompts, config.max_text_len,
                                truncate=True)
  # A sample is named by (seed, prompt, sample index): cvqcar.dq.sampler
  # draws the same one on any mesh.
  keys = sampling.sample_keys(
      config.seed, np.repeat(np.arange(len(s.prompts)), s.per_prompt),
      np.tile(np.arange(s.per_prompt), len(s.prompts)))
  codes, positions, lengths = dq.generate(
      nnx.merge(graphdef, params), (ids, mask), keys,
      temperature=s.temperature, top_k=s.top_k, top_p=s.top_p,
      cfg_scale=s.cfg_scale)
  images = jax.jit(tokenizer.decode)(
      dynamic.DynamicTokens(codes, positions, lengths))
  rows = np.asarray(images).reshape((len(s.prompts), s.per_prompt) +
                                    images.shape[1:])
  return visualize.strip_grid(rows), np.asarray(lengths)


def train(config, codes_nl, positions_nl, lengths_n, class_ids_n,
          steps: int):
  """Trains a fresh class-conditioned model on N encoded sequences on one
  device; -> (model, losses [steps]).

  `config` has `model` (DQConfig fields), `optimizer` (as read by
  cvqcar.optim.make_optimizer), `batch_size`, `seed`, `cond_drop_prob` and
  optionally `num_train_steps` (the schedule's length; default `steps`).
  Rows are drawn at random each step.
  """
  model_cfg = dq.DQConfig(**dict(config.model))
  codes_nl, positions_nl = np.asarray(codes_nl), np.asarray(positions_nl)
  lengths_n, class_ids_n = np.asarray(lengths_n), np.asarray(class_ids_n)
  n = positions_nl.shape[0]
  if codes_nl.shape != positions_nl.shape or class_ids_n.shape != (n,):
    raise ValueError(f"codes {codes_nl.shape}, positions"
                     f" {positions_nl.shape}, class_ids {class_ids_n.shape};"
                     " expected [N, T], [N, T], [N]")
  dq.check_sequences(positions_nl, lengths_n, model_cfg.num_regions,
                     levels=model_cfg.levels)
  if codes_nl.min() < 0 or codes_nl.max() >= model_cfg.num_codes:
    raise ValueError(f"codes span {codes_nl.min()}..{codes_nl.max()};"
                     f" expected 0..{model_cfg.num_codes - 1}")
  dq.check_condition(model_cfg, class_ids_n)
  tx = optim.make_optimizer(ml_collections.ConfigDict({
      "optimizer": config.optimizer,
      "num_train_steps": config.get("num_train_steps") or steps}))
  graphdef, params = nnx.split(dq.DQTransformer(model_cfg,
                                                rngs=nnx.Rngs(config.seed)))
  state = TrainState(step=jnp.zeros((), jnp.int32), params=params,
                     opt_state=tx.init(params))
  step_fn = jax.jit(functools.partial(
      train_step, graphdef=graphdef, tx=tx,
      cond_drop_prob=float(config.cond_drop_prob)), donate_argnums=(0,))
  rng = np.random.default_rng(config.seed)
  key = jax.random.key(config.seed + 1)
  arrays = {"class_ids": class_ids_n.astype(np.int32),
            "codes": codes_nl.astype(np.int32),
            "positions": positions_nl.astype(np.int32),
            "lengths": lengths_n.astype(np.int32)}
  losses = []
  for _ in range(steps):
    rows = rng.choice(n, config.batch_size, replace=n < config.batch_size)
    state, metrics = step_fn(state, {k: v[rows] for k, v in arrays.items()},
                             key)
    losses.append(metrics["loss"])
  losses = np.asarray(jax.device_get(losses), np.float32)
  if not np.isfinite(losses).all():
    first = int(np.flatnonzero(~np.isfinite(losses))[0])
    raise FloatingPointError(f"non-finite DQ-Transformer loss from step"
                             f" {first + 1} of {steps}")
  return nnx.merge(graphdef, state.params), losses
