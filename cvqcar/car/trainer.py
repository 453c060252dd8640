"""CAR training: stage I (LLM frozen), stage II (all); workdir loading."""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
import time
from typing import Any, NamedTuple

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from clu import metric_writers, periodic_actions
from etils import epath
from flax import nnx

from cvqcar import checkpoint, sharding, visualize
from cvqcar.car import model as car_lib
from cvqcar.car import qwen3, sampling
from cvqcar.data import pairs, text
from cvqcar.tokenizer import export
from cvqcar.tokenizer import trainer as tokenizer_trainer

# What must match between a workdir and the config that resumes it.
SECTIONS = ("tokenizer", "llm_config", "stage")


@flax.struct.dataclass
class CarState:
  step: jax.Array
  params: nnx.State  # what this stage trains
  frozen: nnx.State  # frozen parameters and the tokenizer codebook
  opt_state: Any


def tokenizer_shape(tok_cfg) -> tuple[int, int, int]:
  """(K, C, h*w) of a tokenizer model config."""
  side = tok_cfg.resolution // 2 ** (len(tok_cfg.channel_mults) - 1)
  if tok_cfg.quantize != "channel":
    raise ValueError("CAR predicts channel tokens: config.tokenizer.quantize"
                     f" must be 'channel', got {tok_cfg.quantize!r}")
  return tok_cfg.num_codes, tok_cfg.latent_channels, side * side


def resolve_llm_config(config) -> qwen3.Qwen3Config:
  if config.llm.hf_dir:
    import json

    path = epath.Path(config.llm.hf_dir) / "config.json"
    return qwen3.Qwen3Config.from_hf_dict(json.loads(path.read_text()))
  if config.llm.preset not in qwen3.PRESETS:
    raise ValueError(f"config.llm.preset must be one of"
                     f" {sorted(qwen3.PRESETS)}, got {config.llm.preset!r}")
  return qwen3.PRESETS[config.llm.preset]


def resolve_text_tokenizer(config) -> str:
  """The text tokenizer for this config's backbone.

  'auto' is the tokenizer.json beside a pretrained backbone's weights
  (config.llm.hf_dir), else byte-level for a randomly initialised one.
  Byte ids fed to a pretrained backbone would index embeddings trained for
  other tokens, so that combination is refused.
  """
  spec, hf_dir = config.text_tokenizer, config.llm.hf_dir
  if spec == "auto":
    return hf_dir or "bytes"
  if spec == "bytes" and hf_dir:
    raise ValueError(
        f"config.text_tokenizer='bytes' with the pretrained backbone"
        f" config.llm.hf_dir={hf_dir!r}: its embeddings expect its own"
        " tokenizer's ids; use 'auto' (the tokenizer.json beside the"
        " weights) or the path of that tokenizer.json")
  return spec


def build_car(config, llm_cfg: qwen3.Qwen3Config, key,
              codebook_kd=None) -> car_lib.CAR:
  """A CAR with random (or HF) backbone weights; zeros for the codebook
  unless given (it is overwritten by the tokenizer's or a checkpoint's)."""
  num_codes, channels, code_dim = tokenizer_shape(config.tokenizer)
  rngs = nnx.Rngs(params=key)
  if config.llm.hf_dir:
    backbone, _ = qwen3.from_hf(config.llm.hf_dir)
  else:
    backbone = qwen3.Qwen3(llm_cfg, rngs=rngs)
  if codebook_kd is None:
    codebook_kd = jnp.zeros((num_codes, code_dim), jnp.float32)
  return car_lib.CAR(backbone, codebook_kd, channels, rngs=rngs)


def load_frozen_tokenizer(config):
  """The export named by the config, checked against config.tokenizer."""
  expect = ml_collections.ConfigDict({"model": config.tokenizer})
  return export.load_tokenizer(config.tokenizer_export, expect=expect)


def train_step(state: CarState, batch, key, tok_state, *, graphdef,
               tok_graphdef, tx, config):
  """One update; images are tokenized by the frozen tokenizer in the step
  unless the batch carries pre-tokenized 'tokens'."""
  key = jax.random.fold_in(key, state.step)
  if "tokens" in batch:
    tokens = batch["tokens"]
  else:
    tokens = nnx.merge(tok_graphdef, tok_state).encode(batch["image"])
  mask = car_lib.drop_prompts(batch["text_mask"], config.cfg_drop_prob, key)

  def loss_fn(params):
    model = nnx.merge(graphdef, params, state.frozen)
    logits = model(batch["text"], mask, tokens)
    accuracy = jnp.mean(jnp.argmax(logits, -1) == tokens)
    return car_lib.loss_fn(logits, tokens), accuracy

  (loss, accuracy), grads = jax.value_and_grad(loss_fn, has_aux=True)(
      state.params)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  metrics = {"loss": loss, "accuracy": accuracy,
             "grad_norm": optax.tree.norm(grads)}
  return state.replace(step=state.step + 1, params=params,
                       opt_state=opt_state), metrics


class Summary(NamedTuple):
  train: dict[int, dict[str, float]]
  eval: dict[str, float]
  last_step: int


def _init_model(config, llm_cfg, tokenizer) -> car_lib.CAR:
  model = build_car(config, llm_cfg, jax.random.key(config.seed),
                    codebook_kd=tokenizer.quantizer.vq.codebook())
  if config.stage == 2:
    if not config.init_from:
      raise ValueError("stage II starts from stage I: set"
                       " config.init_from to a stage-I workdir")
    start, _ = load_from_workdir(config.init_from)
    nnx.update(model, nnx.state(start))
    logging.info("initialised from stage I at %s", config.init_from)
  return model


def train_and_evaluate(config: ml_collections.ConfigDict,
                       workdir: str) -> Summary:
  """Trains CAR on text-image pairs; resumes from `workdir` if it can."""
  config = ml_collections.ConfigDict(config.to_dict())
  llm_cfg = resolve_llm_config(config)
  config.llm_config = dataclasses.asdict(llm_cfg)
  mesh = sharding.make_mesh(config)
  tokenizer = load_frozen_tokenizer(config)
  # Resolved before the config is saved, so exports name the real one.
  config.text_tokenizer = resolve_text_tokenizer(config)
  text_tok = text.load_text_tokenizer(config.text_tokenizer)
  if text_tok.vocab_size > llm_cfg.vocab_size:
    raise ValueError(f"text tokenizer has {text_tok.vocab_size} ids but the"
                     f" LLM only {llm_cfg.vocab_size} embeddings")
  model = _init_model(config, llm_cfg, tokenizer)
  graphdef, params, frozen = nnx.split(
      model, car_lib.trainable(config.stage), ...)
  tok_graphdef, tok_state = nnx.split(tokenizer)
  tok_state = jax.device_put(tok_state, sharding.replicated(mesh))
  tx = tokenizer_trainer.make_optimizer(config)
  state = CarState(step=jnp.zeros((), jnp.int32), params=params,
                   frozen=frozen, opt_state=tx.init(params))
  shardings = sharding.state_shardings(state, mesh, config)
  state = jax.device_put(state, shardings)
  rep = sharding.replicated(mesh)
  step_fn = jax.jit(
      functools.partial(train_step, graphdef=graphdef,
                        tok_graphdef=tok_graphdef, tx=tx, config=config),
      in_shardings=(shardings, sharding.batch_sharded(mesh), rep, rep),
      out_shardings=(shardings, rep), donate_argnums=(0,))
  eval_fn = jax.jit(lambda params, frozen, batch, tok_state: car_lib.loss_fn(
      *_teacher_forced(graphdef, params, frozen, tok_graphdef, tok_state,
                       batch)))

  ckpt = checkpoint.Checkpointer(workdir, config, sections=SECTIONS)
  train_iter = iter(pairs.train_dataset(config, text_tok))
  eval_ds = pairs.eval_dataset(config, text_tok)
  if ckpt.latest_step() is not None:
    abstract = jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
        state, shardings)
    state = ckpt.restore(abstract, train_iter)
  writer = metric_writers.create_default_writer(
      workdir, just_logging=jax.process_index() > 0)
  start, total = int(state.step), config.num_train_steps
  stop = min(total, start + config.run_steps) if config.run_steps else total
  progress = periodic_actions.ReportProgress(
      num_train_steps=total, writer=writer, every_steps=config.log_every)
  summary = Summary(train={}, eval={}, last_step=start)
  key = jax.random.key(config.seed + 1)

  def run_eval(step):
    t0 = time.time()
    losses = []
    for local in eval_ds:
      batch = sharding.global_batch(local, mesh)
      losses.append(float(eval_fn(state.params, state.frozen, batch,
                                  tok_state)))
    summary.eval.update({"eval/loss": float(np.mean(losses))})
    strips = _sample_strips(config, graphdef, state, tokenizer, text_tok)
    path = os.path.join(workdir, "images", f"samples_{step:07d}.png")
    if jax.process_index() == 0:
      visualize.save_png(visualize.strip_grid(strips), path)
    writer.write_scalars(step, summary.eval)
    logging.info("eval at step %d (%.1fs): loss %.4f; samples %s", step,
                 time.time() - t0, summary.eval["eval/loss"], path)

  if start == 0:
    run_eval(0)
  history, first, step = [], start + 1, start
  for step in range(start + 1, stop + 1):
    batch = sharding.global_batch(next(train_iter), mesh)
    with jax.set_mesh(mesh):
      state, m = step_fn(state, batch, key, tok_state)
    history.append(m)
    progress(step)
    last = step == stop
    if step % config.log_every == 0 or last:
      history = jax.device_get(history)
      for i, h in enumerate(history):
        if not np.isfinite(h["loss"]):
          raise FloatingPointError(f"non-finite CAR loss at step {first + i}")
        summary.train[first + i] = {f"train/{k}": float(v)
                                    for k, v in h.items()}
      writer.write_scalars(step, {f"train/{k}": float(np.mean(
          [h[k] for h in history])) for k in history[0]})
      history, first = [], step + 1
    if step % config.eval_every == 0 or step == total:
      run_eval(step)
    if step % config.checkpoint_every == 0 or last:
      ckpt.save(step, state, train_iter, force=last)
  ckpt.wait()
  writer.flush()
  return summary._replace(last_step=step)


def _teacher_forced(graphdef, params, frozen, tok_graphdef, tok_state, batch):
  if "tokens" in batch:
    tokens = batch["tokens"]
  else:
    tokens = nnx.merge(tok_graphdef, tok_state).encode(batch["image"])
  model = nnx.merge(graphdef, params, frozen)
  return model(batch["text"], batch["text_mask"], tokens), tokens


def _sample_strips(config, graphdef, state, tokenizer, text_tok):
  prompts = list(config.sample.prompts)
  ids, mask = text.batch_encode(text_tok, prompts, config.max_text_len,
                                truncate=True)
  s = config.sample
  tokens = sampling.generate(
      graphdef, (state.params, state.frozen),
      jnp.asarray(ids), jnp.asarray(mask), jax.random.key(config.seed),
      temperature=s.temperature, top_k=s.top_k, top_p=s.top_p,
      cfg_scale=s.cfg_scale)
  return sampling.coarse_to_fine_strip(tokenizer, tokens)


def abstract_state(config):
  """(graphdef, abstract CarState) for a saved config, without weights."""
  llm_cfg = qwen3.Qwen3Config(**config.llm_config)
  cfg = ml_collections.ConfigDict(config.to_dict())
  cfg.llm.hf_dir = ""  # shapes come from llm_config; weights from the save
  model = nnx.eval_shape(lambda: build_car(cfg, llm_cfg, jax.random.key(0)))
  graphdef, params, frozen = nnx.split(
      model, car_lib.trainable(config.stage), ...)
  tx = tokenizer_trainer.make_optimizer(config)
  opt = jax.eval_shape(tx.init, params)
  return graphdef, CarState(step=jax.ShapeDtypeStruct((), jnp.int32),
                            params=params, frozen=frozen, opt_state=opt)


def load_from_workdir(workdir: str
                      ) -> tuple[car_lib.CAR, ml_collections.ConfigDict]:
  """The CAR model of a training workdir's latest checkpoint, and its
  config."""
  config = checkpoint.load_config(workdir)
  graphdef, abstract = abstract_state(config)
  state = checkpoint.Checkpointer(workdir, config, read_only=True,
                                  sections=SECTIONS).restore(abstract)
  return nnx.merge(graphdef, state.params, state.frozen), config
