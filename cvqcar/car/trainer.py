"""CAR training: stage I (LLM frozen), stage II (all); workdir loading."""

from __future__ import annotations

import dataclasses
import logging
import os
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from cvqcar import checkpoint, fingerprint, loop, metrics, sharding, visualize
from cvqcar.car import model as car_lib
from cvqcar.car import sampling
from cvqcar.car import state as car_state
from cvqcar.data import pairs, text
from cvqcar.tokenizer import export

# What must match between a workdir and the config that resumes it.
SECTIONS = ("tokenizer", "llm_config", "stage")
CarState = car_state.CarState
abstract_state = car_state.abstract_state
train_step = car_state.train_step
make_train_step = car_state.make_train_step


def resolve_text_tokenizer(config) -> str:
  """The text tokenizer for this config's backbone.

  'auto' is the tokenizer.json beside a pretrained backbone's weights
  (config.llm.hf_dir), else byte-level for a randomly initialised one.
  Byte ids fed to a pretrained backbone would index embeddings trained for
  other tokens, so that combination is refused. A class-conditional config
  (config.num_classes > 0) reads class indices ('classes:N').
  """
  spec, hf_dir = config.text_tokenizer, config.llm.hf_dir
  if config.get("num_classes", 0):  # class-conditional: the prompt a class
    return f"{text.CLASSES_PREFIX}{config.num_classes}"
  if spec == "auto":
    return hf_dir or "bytes"
  if spec == "bytes" and hf_dir:
    raise ValueError(
        f"config.text_tokenizer='bytes' with the pretrained backbone"
        f" config.llm.hf_dir={hf_dir!r}: its embeddings expect its own"
        " tokenizer's ids; use 'auto' (the tokenizer.json beside the"
        " weights) or the path of that tokenizer.json")
  return spec


def load_frozen_tokenizer(config):
  """The export named by the config, checked against config.tokenizer."""
  expect = ml_collections.ConfigDict({"model": config.tokenizer})
  return export.load_tokenizer(config.tokenizer_export, expect=expect)


Summary = loop.Summary


def _stage1_params(config, mesh, record):
  """Stage I's trained params from config.init_from, on the mesh."""
  if not config.init_from:
    raise ValueError("stage II starts from stage I: set config.init_from to"
                     " a stage-I workdir")
  saved = checkpoint.load_config(config.init_from)
  if saved.stage != 1:
    raise ValueError(f"config.init_from={config.init_from!r} is a stage"
                     f" {saved.stage} workdir; expected stage I")
  car_state.check_backbone(config.init_from, record, "the stage-I workdir")
  # Stage II keeps stage I's projector and head, so the codebook they were
  # trained on must be the one this run loads.
  fingerprint.check_record(
      config.init_from, export.tokenizer_record(config.tokenizer_export),
      "the stage-I workdir", allow=config.allow_tokenizer_mismatch)
  _, abstract = car_state.abstract_state(saved)
  abstract = abstract.saved()
  target = car_state.with_shardings(
      abstract, sharding.state_shardings(abstract, mesh, config))
  restored = checkpoint.Checkpointer(
      config.init_from, saved, read_only=True,
      sections=SECTIONS).restore(target)
  logging.info("initialised from stage I at %s", config.init_from)
  return restored.params


def prepare(config, workdir: str | None = None):
  """The resolved config, mesh, frozen tokenizer, text tokenizer and the
  backbone record; refuses a workdir trained on another backbone or
  another tokenizer export (unless config.allow_tokenizer_mismatch)."""
  config = ml_collections.ConfigDict(config.to_dict())
  llm_cfg = car_state.resolve_llm_config(config)
  config.llm_config = dataclasses.asdict(llm_cfg)
  mesh = sharding.make_mesh(config)
  tokenizer = load_frozen_tokenizer(config)
  # Resolved before the config is saved, so exports name the real one.
  config.text_tokenizer = resolve_text_tokenizer(config)
  text_tok = text.load_text_tokenizer(config.text_tokenizer)
  if text_tok.vocab_size > llm_cfg.vocab_size:
    raise ValueError(f"text tokenizer has {text_tok.vocab_size} ids but the"
                     f" LLM only {llm_cfg.vocab_size} embeddings")
  record = car_state.backbone_record(config)
  if workdir is not None:
    car_state.check_backbone(workdir, record, "the workdir")
    fingerprint.check_record(
        workdir, export.tokenizer_record(config.tokenizer_export),
        "the workdir", allow=config.allow_tokenizer_mismatch)
  return config, mesh, tokenizer, text_tok, record


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str,
                       on_log=None) -> Summary:
  """Trains CAR on text-image pairs; resumes from `workdir` if it can.
  `on_log(step, num_train_steps, scalars)` sees every logged set of
  scalars (e.g. cvqcar.figures.LiveProgress)."""
  config, mesh, tokenizer, text_tok, record = prepare(config, workdir)
  start_params = (_stage1_params(config, mesh, record)
                  if config.stage == 2 else None)
  graphdef, state, shardings = car_state.init_state(
      config, mesh, tokenizer.quantizer.vq.codebook(), start_params)
  # Held only until the loop takes it (or its backbone, when resuming):
  # no second copy of the weights lives through the run.
  fresh = {"state": state}
  del state, start_params
  tok_graphdef, tok_state = nnx.split(tokenizer)
  tok_state = jax.device_put(tok_state, sharding.replicated(mesh))
  step_fn = make_train_step(config, graphdef, tok_graphdef, shardings, mesh)
  eval_loss = make_eval_loss(graphdef, tok_graphdef, mesh)
  pairs.padded_eval_batches(config, text_tok)  # refuses an empty eval set

  def evaluate(step, state, writer):
    del writer
    t0 = time.time()
    loss, count = eval_loss(state, tok_state,
                            pairs.padded_eval_batches(config, text_tok))
    scalars = {"eval/loss": loss, "eval/examples": float(count)}
    strips = _sample_strips(config, graphdef, state, tokenizer, text_tok)
    path = os.path.join(workdir, "images", f"samples_{step:07d}.png")
    if jax.process_index() == 0:
      ks = metrics.prefix_lengths(config.tokenizer.latent_channels)
      visualize.save_png(visualize.strip_grid(
          strips, column_titles=visualize.prefix_titles(ks),
          row_titles=list(config.sample.prompts)), path)
    logging.info("eval at step %d (%.1fs): loss %.4f; samples %s", step,
                 time.time() - t0, scalars["eval/loss"], path)
    return scalars

  task = loop.Task(
      what=f"CAR stage {config.stage}", mesh=mesh,
      init=lambda: fresh.pop("state"),
      restore_target=car_state.with_shardings(fresh["state"].saved(),
                                              shardings.saved()),
      from_saved=lambda saved: saved.replace(
          backbone=fresh.pop("state").backbone),
      to_saved=lambda s: s.saved(), step=step_fn,
      step_args=(jax.random.key(config.seed + 1), tok_state),
      evaluate=evaluate,
      train_data=lambda start: pairs.train_dataset(config, text_tok, start),
      sections=SECTIONS,
      # The LLM's sequence: the prompt, the begin token, C - 1 channels.
      tokens_per_example=config.max_text_len
      + config.tokenizer.latent_channels,
      on_start=lambda: write_records(workdir, config, record))
  return loop.run(config, workdir, task, on_log=on_log)


def write_records(workdir: str, config, backbone: dict[str, str]) -> None:
  """Pins the workdir to its backbone and tokenizer export (process 0)."""
  car_state.write_backbone_record(workdir, backbone)
  export.write_tokenizer_record(
      workdir, export.tokenizer_record(config.tokenizer_export))


def make_eval_loss(graphdef, tok_graphdef, mesh):
  """eval_loss(state, tok_state, batches) -> (loss, examples): the mean
  over the real rows (batch 'mask') of each example's cross-entropy over
  its C tokens, each example counted once however the batches pad."""

  @jax.jit
  def sums(state, batch, tok_state):
    logits_bck, tokens_bc = _teacher_forced(graphdef, state, tok_graphdef,
                                            tok_state, batch)
    logp = jax.nn.log_softmax(logits_bck.astype(jnp.float32), axis=-1)
    nll_b = -jnp.take_along_axis(logp, tokens_bc[..., None],
                                 axis=-1)[..., 0].mean(-1)
    real_b = batch["mask"] > 0
    # where, not a product: a padding row's loss is not read at all.
    return jnp.sum(jnp.where(real_b, nll_b, 0.0)), jnp.sum(real_b)

  def eval_loss(state, tok_state, batches) -> tuple[float, int]:
    total, count = 0.0, 0
    for local in batches:
      local.pop("corrupt", None)  # a count of this process's, not a row
      s, n = sums(state, sharding.global_batch(local, mesh), tok_state)
      total, count = total + float(s), count + int(n)
    if not count:
      raise ValueError("no eval example could be read (all corrupt?)")
    return total / count, count

  return eval_loss


def _teacher_forced(graphdef, state, tok_graphdef, tok_state, batch):
  if "tokens" in batch:
    tokens = batch["tokens"]
  else:
    tokens = nnx.merge(tok_graphdef, tok_state).encode(batch["image"])
  return state.model(graphdef)(batch["text"], batch["text_mask"],
                               tokens), tokens


def _sample_strips(config, graphdef, state, tokenizer, text_tok):
  prompts = list(config.sample.prompts)
  ids, mask = text.batch_encode(text_tok, prompts, config.max_text_len,
                                truncate=True)
  s = config.sample
  tokens = sampling.generate(
      graphdef, (state.params, state.backbone, state.frozen),
      jnp.asarray(ids), jnp.asarray(mask),
      # Prompt i's strip is sample 0 of prompt i (what cvqcar.sample draws).
      sampling.sample_keys(config.seed, np.arange(len(prompts)),
                           np.zeros(len(prompts))),
      temperature=s.temperature, top_k=s.top_k, top_p=s.top_p,
      cfg_scale=s.cfg_scale,
      # Configs saved before schedules existed have no cfg_schedule.
      cfg_schedule=s.get("cfg_schedule", "constant"))
  return sampling.coarse_to_fine_strip(tokenizer, tokens)


def load_from_workdir(workdir: str
                      ) -> tuple[car_lib.CAR, ml_collections.ConfigDict]:
  """The CAR model of a training workdir's latest checkpoint, and its
  config, sharded FSDP-style over all devices. A stage-I workdir's backbone
  is re-read from its recorded source and checked against the record."""
  config = checkpoint.load_config(workdir)
  one = ml_collections.ConfigDict(config.to_dict())
  one.mesh = ml_collections.ConfigDict({"data": 1, "fsdp": -1, "model": 1})
  one.dcn_mesh = ml_collections.ConfigDict({"data": 1, "fsdp": 1,
                                            "model": 1})
  one.batch_size = jax.device_count()
  mesh = sharding.make_mesh(one)
  car_state.check_backbone(workdir, car_state.backbone_record(config),
                           "the workdir")
  _, abstract = car_state.abstract_state(config)
  codebook = np.zeros(abstract.frozen["codebook_kd"].get_value().shape,
                      np.float32)  # the checkpoint's replaces it
  graphdef, state, shardings = car_state.init_state(one, mesh, codebook)
  restored = checkpoint.Checkpointer(
      workdir, config, read_only=True, sections=SECTIONS).restore(
          car_state.with_shardings(state.saved(), shardings.saved()))
  return restored.replace(backbone=state.backbone).model(graphdef), config
