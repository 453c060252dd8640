"""CAR train state and step: created sharded, saved without what is frozen.

The state is built inside one jit whose outputs carry the mesh shardings, so
no model-sized array ever sits on one device or on the host: random weights
are drawn shard by shard, a Hugging Face backbone is read slice by slice
(`hf_io.load_state`), and stage II's stage-I weights are restored already
resharded. Stage I keeps its frozen backbone out of checkpoints; instead the
workdir records where the backbone came from (`backbone.json`: path and a
content hash) and refuses to resume on another one.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import logging
import os
import time
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
from etils import epath
from flax import nnx
from jax.experimental import multihost_utils

from cvqcar import optim, sharding
from cvqcar.car import hf_io, qwen3
from cvqcar.car import model as car_lib

BACKBONE_FILE = "backbone.json"
# config.llm fields that override the backbone's Qwen3Config when set.
LLM_OVERRIDES = ("dtype", "param_dtype", "scan_layers", "remat", "attention")
# Qwen3Config fields that do not change the weights.
_RUNTIME_FIELDS = ("dtype", "scan_layers", "remat", "attention")


@flax.struct.dataclass
class CarState:
  step: jax.Array
  params: nnx.State  # what this stage trains
  backbone: nnx.State  # the frozen LLM in stage I; empty in stage II
  frozen: nnx.State  # the tokenizer's codebook
  opt_state: Any

  def model(self, graphdef) -> car_lib.CAR:
    return nnx.merge(graphdef, self.params, self.backbone, self.frozen)

  def saved(self) -> CarState:
    """What a checkpoint holds: everything but the frozen backbone."""
    return self.replace(backbone=nnx.State({}))


def tokenizer_shape(tok_cfg) -> tuple[int, int, int]:
  """(K, C, h*w) of a tokenizer model config."""
  side = tok_cfg.resolution // 2 ** (len(tok_cfg.channel_mults) - 1)
  if tok_cfg.quantize != "channel":
    raise ValueError("CAR predicts channel tokens: config.tokenizer.quantize"
                     f" must be 'channel', got {tok_cfg.quantize!r}")
  if tok_cfg.get("rvq_depth", 1) > 1:
    raise ValueError("CAR predicts one code per channel: a residual VQ"
                     f" tokenizer (rvq_depth={tok_cfg.rvq_depth}) is not"
                     " supported")
  return tok_cfg.num_codes, tok_cfg.latent_channels, side * side


def resolve_llm_config(config) -> qwen3.Qwen3Config:
  """The backbone's config: config.json beside llm.hf_dir's weights or the
  llm.preset, with the llm.{dtype, param_dtype, remat, ...} fields set."""
  if config.llm.hf_dir:
    base = hf_io.read_config(config.llm.hf_dir)
  elif config.llm.preset in qwen3.PRESETS:
    base = qwen3.PRESETS[config.llm.preset]
  else:
    raise ValueError(f"config.llm.preset must be one of"
                     f" {sorted(qwen3.PRESETS)}, got {config.llm.preset!r}")
  changes = {k: config.llm[k] for k in LLM_OVERRIDES
             if config.llm.get(k) not in (None, "")}
  return dataclasses.replace(base, **changes)


def build_car(config, llm_cfg: qwen3.Qwen3Config, key,
              codebook_kd=None) -> car_lib.CAR:
  """A CAR with random weights; zeros for the codebook unless given."""
  num_codes, channels, code_dim = tokenizer_shape(config.tokenizer)
  rngs = nnx.Rngs(params=key)
  backbone = qwen3.Qwen3(llm_cfg, rngs=rngs)
  if codebook_kd is None:
    codebook_kd = jnp.zeros((num_codes, code_dim), jnp.float32)
  return car_lib.CAR(backbone, codebook_kd, channels,
                     num_classes=config.get("num_classes", 0), rngs=rngs)


def split(model: car_lib.CAR, stage: int):
  """graphdef, trained params, frozen backbone (stage I), the rest."""
  return nnx.split(model, car_lib.trainable(stage),
                   nnx.PathContains("backbone"), ...)


def abstract_state(config) -> tuple[Any, CarState]:
  """(graphdef, abstract CarState) of a config with `llm_config` resolved;
  nothing is allocated."""
  llm_cfg = qwen3.Qwen3Config(**config.llm_config)
  model = nnx.eval_shape(lambda: build_car(config, llm_cfg,
                                           jax.random.key(0)))
  graphdef, params, backbone, frozen = split(model, config.stage)
  tx = optim.make_optimizer(config)
  return graphdef, CarState(
      step=jax.ShapeDtypeStruct((), jnp.int32), params=params,
      backbone=backbone, frozen=frozen, opt_state=jax.eval_shape(
          tx.init, params))


def with_shardings(abstract, shardings):
  return jax.tree.map(
      lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
      abstract, shardings)


def _backbone_shardings(shardings: CarState, stage: int) -> dict:
  tree = (shardings.params if stage == 2 else shardings.backbone)["backbone"]
  return {path: v.get_value() for path, v in nnx.to_flat_state(tree)}


def init_state(config, mesh, codebook_kd, start_params=None):
  """(graphdef, CarState, shardings): the state created sharded.

  The backbone is llm.hf_dir's weights or random; `start_params` (stage
  II: stage I's trained params, already on the mesh) replace the matching
  fresh parameters.
  """
  llm_cfg = qwen3.Qwen3Config(**config.llm_config)
  graphdef, abstract = abstract_state(config)
  shardings = sharding.state_shardings(abstract, mesh, config)
  tx = optim.make_optimizer(config)
  backbone = None
  if config.llm.hf_dir:
    t0 = time.time()
    backbone = hf_io.load_state(config.llm.hf_dir, llm_cfg,
                                _backbone_shardings(shardings, config.stage))
    logging.info("read the backbone's slices from %s in %.1fs",
                 config.llm.hf_dir, time.time() - t0)

  def init(key, codebook, backbone, start):
    # XLA drops the random backbone when a loaded one replaces it.
    model = build_car(config, llm_cfg, key, codebook)
    if backbone is not None:
      nnx.update(model.backbone, backbone)
    if start is not None:
      nnx.update(model, start)
    _, params, frozen_backbone, frozen = split(model, config.stage)
    return CarState(step=jnp.zeros((), jnp.int32), params=params,
                    backbone=frozen_backbone, frozen=frozen,
                    opt_state=tx.init(params))

  state = jax.jit(init, out_shardings=shardings, donate_argnums=(2, 3))(
      jax.random.key(config.seed), np.asarray(codebook_kd), backbone,
      start_params)
  return graphdef, state, shardings


def backbone_record(config) -> dict[str, str]:
  """Where the backbone's weights come from, with a content hash."""
  if not config.llm.hf_dir:
    arch = {k: v for k, v in config.llm_config.items()
            if k not in _RUNTIME_FIELDS}
    blob = json.dumps({"llm": arch, "seed": config.seed}, sort_keys=True)
    return {"source": f"random init (seed {config.seed})",
            "sha256": hashlib.sha256(blob.encode()).hexdigest()}
  directory = os.path.abspath(config.llm.hf_dir)
  digest = np.zeros(32, np.uint8)
  if jax.process_index() == 0:
    digest = np.frombuffer(_hash_files(directory), np.uint8)
  if jax.process_count() > 1:
    digest = multihost_utils.broadcast_one_to_all(digest)
  return {"source": directory, "sha256": bytes(np.asarray(digest)).hex()}


def _hash_files(directory: str) -> bytes:
  """sha256 over the names and contents of config.json and the weights."""
  names = sorted(n for n in os.listdir(directory)
                 if n == hf_io.HF_CONFIG or n.endswith(".safetensors"))
  total = sum(os.path.getsize(os.path.join(directory, n)) for n in names)
  logging.info("hashing the backbone's %d files (%.2f GB) in %s", len(names),
               total / 1e9, directory)
  h, t0 = hashlib.sha256(), time.time()
  for name in names:
    h.update(name.encode() + b"\0")
    with open(os.path.join(directory, name), "rb") as f:
      while chunk := f.read(16 << 20):
        h.update(chunk)
  logging.info("hashed the backbone in %.1fs", time.time() - t0)
  return h.digest()


def read_backbone_record(workdir: str) -> dict[str, str] | None:
  path = epath.Path(workdir) / BACKBONE_FILE
  return json.loads(path.read_text()) if path.exists() else None


def check_backbone(workdir: str, record: dict[str, str], what: str) -> None:
  """Refuses a workdir whose recorded backbone differs from `record`."""
  saved = read_backbone_record(workdir)
  if saved is not None and saved["sha256"] != record["sha256"]:
    raise ValueError(
        f"{what} {workdir} was trained on the backbone {saved['source']}"
        f" (sha256 {saved['sha256'][:12]}...), but this run's backbone is"
        f" {record['source']} (sha256 {record['sha256'][:12]}...); point"
        " config.llm.hf_dir (and config.seed) at the original weights")


def write_backbone_record(workdir: str, record: dict[str, str]) -> None:
  # Orbax and grain load here: the train step imports without them.
  from cvqcar import checkpoint  # noqa: PLC0415

  if jax.process_index() == 0:
    checkpoint.write_text(workdir, BACKBONE_FILE,
                          json.dumps(record, indent=2))


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
    model = state.replace(params=params).model(graphdef)
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


def make_train_step(config, graphdef, tok_graphdef, shardings, mesh):
  rep = sharding.replicated(mesh)
  tx = optim.make_optimizer(config)
  return jax.jit(
      functools.partial(train_step, graphdef=graphdef,
                        tok_graphdef=tok_graphdef, tx=tx, config=config),
      in_shardings=(shardings, sharding.batch_sharded(mesh), rep, rep),
      out_shardings=(shardings, rep), donate_argnums=(0,))
