"""Params-only DQ-Transformer exports: write one from a workdir, load one.

An export is OUT/config.json plus OUT/params (the trained parameters, no
optimizer state), which `load_dq` turns back into a DQTransformer, and
OUT/tokenizer_export.json, the record of the DQ-VAE export it was trained
with (as a CAR export).
"""

from __future__ import annotations

import logging

import jax
import ml_collections
from etils import epath
from flax import nnx

from cvqcar import checkpoint, fingerprint, optim, sharding
from cvqcar.car import state as car_state
from cvqcar.dq import trainer as dq_trainer
from cvqcar.dq import transformer as dq
from cvqcar.tokenizer import export as tokenizer_export


def model_config(config: ml_collections.ConfigDict) -> dq.DQConfig:
  """The DQConfig a saved (resolved) training config describes."""
  return dq.DQConfig(**config.model.to_dict())


def restore_params(workdir: str) -> tuple[nnx.State,
                                          ml_collections.ConfigDict]:
  """The trained parameters of a workdir's latest checkpoint (FSDP-sharded
  over all devices), and its config."""
  config = checkpoint.load_config(workdir)
  one = ml_collections.ConfigDict(config.to_dict())
  one.mesh = ml_collections.ConfigDict({"data": 1, "fsdp": -1, "model": 1})
  one.dcn_mesh = ml_collections.ConfigDict({"data": 1, "fsdp": 1,
                                            "model": 1})
  mesh = sharding.make_mesh(one)
  _, state, shardings = dq_trainer.init_state(
      one, model_config(config), mesh, optim.make_optimizer(config))
  restored = checkpoint.Checkpointer(
      workdir, config, read_only=True, sections=dq_trainer.SECTIONS
  ).restore(car_state.with_shardings(state, shardings))
  return restored.params, config


def export_dq(workdir: str, out: str, overwrite: bool = False) -> str:
  """Params-only export of the latest checkpoint in `workdir`, with its
  tokenizer record; a different export at `out` needs `overwrite`."""
  params, config = restore_params(workdir)
  checkpoint.save_export(out, config, {"params": params},
                         overwrite=overwrite)
  rec = fingerprint.read_record(workdir)
  if rec is not None:
    tokenizer_export.write_tokenizer_record(out, rec)
  else:
    logging.warning("%s has no %s: %s cannot be checked against a DQ-VAE"
                    " export", workdir, fingerprint.RECORD_FILE, out)
    if jax.process_index() == 0:  # not a replaced export's record
      (epath.Path(out) / fingerprint.RECORD_FILE).unlink(missing_ok=True)
  return out


def load_dq(path: str) -> tuple[dq.DQTransformer, ml_collections.ConfigDict]:
  """A DQTransformer from an export directory, and its config."""
  config = checkpoint.load_config(path)
  graphdef, abstract = nnx.split(nnx.eval_shape(
      lambda: dq.DQTransformer(model_config(config), rngs=nnx.Rngs(0))))
  restored = checkpoint.restore_export(path, {"params": abstract})
  return nnx.merge(graphdef, restored["params"]), config
