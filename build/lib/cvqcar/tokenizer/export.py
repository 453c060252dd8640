"""Params-only tokenizer exports: write one from a training workdir, load one.

An export is OUT/config.json plus OUT/params (EMA generator params plus
codebook state), which `load_tokenizer` turns back into a `Tokenizer`
without the trainer, optimizer or discriminator, and OUT/export.json, its
fingerprint (`tokenizer_record`), which runs made with it record.
"""

from __future__ import annotations

import jax
import ml_collections
from absl import logging
from flax import nnx

from cvqcar import checkpoint, fingerprint, sharding
from cvqcar.tokenizer import model as tokenizer_lib
from cvqcar.tokenizer import trainer as tokenizer_trainer


def export(workdir: str, out: str, step: int | None = None,
           overwrite: bool = False) -> str:
  """Writes the EMA tokenizer of `workdir`'s checkpoint (latest by
  default). A different export already at `out` is replaced only with
  `overwrite`; the same weights again are fine."""
  config = checkpoint.load_config(workdir)
  mesh = sharding.make_mesh(
      _single_device(config), devices=jax.devices()[:1])
  trainer = tokenizer_trainer.Trainer(config, mesh=mesh)
  ckpt = checkpoint.Checkpointer(workdir, config, read_only=True)
  state = ckpt.restore(trainer.abstract_state, step=step)
  checkpoint.save_export(
      out, config, {"params": state.ema_params, "buffers": state.buffers},
      overwrite=overwrite)
  logging.info("exported step %d of %s to %s", int(state.step), workdir, out)
  return out


def train_and_load(config: ml_collections.ConfigDict, workdir: str,
                   on_log=None) -> tokenizer_lib.Tokenizer:
  """Trains (or resumes, or finds finished) the tokenizer in `workdir`,
  exports it to WORKDIR/export and loads it: the notebooks' one call.

  WORKDIR/export is the workdir's own copy, so it follows the workdir: a
  finished run exports the same weights again, and a run trained further
  (or afresh from another seed) replaces it, with a warning. A CAR run
  made with the old copy then refuses the new one by its fingerprint.
  """
  tokenizer_trainer.train_and_evaluate(config, workdir, on_log=on_log)
  return load_tokenizer(export(workdir, f"{workdir.rstrip('/')}/export",
                               overwrite=True))


def _single_device(config):
  config = ml_collections.ConfigDict(config.to_dict())
  for mesh in (config.mesh, config.get("dcn_mesh") or {}):
    for axis in mesh:
      mesh[axis] = 1
  return config


def _restore(path: str, config: ml_collections.ConfigDict):
  abstract = nnx.eval_shape(
      lambda: tokenizer_lib.Tokenizer(config.model, rngs=nnx.Rngs(0)))
  graphdef, params, buffers = nnx.split(abstract, nnx.Param, ...)
  return graphdef, checkpoint.restore_export(
      path, {"params": params, "buffers": buffers})


def load_tokenizer(path: str,
                   expect: ml_collections.ConfigDict | None = None
                   ) -> tokenizer_lib.Tokenizer:
  """Rebuilds the exported tokenizer. With `expect`, a different model
  config is an error naming the fields that differ."""
  config = checkpoint.load_config(path)
  if expect is not None:
    checkpoint.check_same_model(config, expect, path)
  graphdef, restored = _restore(path, config)
  return nnx.merge(graphdef, restored["params"], restored["buffers"])


def tokenizer_record(path: str) -> dict[str, str]:
  """{'source': the export's path, 'sha256': its fingerprint}, read from
  its metadata; an export older than fingerprints is hashed instead."""
  rec = fingerprint.export_record(path)
  if rec is None:  # no export.json and no safetensors: Orbax arrays only
    _, restored = _restore(path, checkpoint.load_config(path))
    rec = fingerprint.record(path, checkpoint.tree_sha256(restored))
  return rec


def write_tokenizer_record(directory: str, rec: dict[str, str]) -> None:
  """Writes DIRECTORY/tokenizer_export.json (process 0, atomically)."""
  if jax.process_index() == 0:
    checkpoint.write_text(directory, fingerprint.RECORD_FILE,
                          fingerprint.record_json(rec))
