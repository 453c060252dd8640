"""Params-only CAR exports: write one from a training workdir, load one.

An export is OUT/config.json plus OUT/params (the trained parameters, the
backbone and the codebook, no optimizer state), which `load_car` turns back
into a CAR, and OUT/tokenizer_export.json, the workdir's record of the
tokenizer export it was trained with, which the samplers check.
"""

from __future__ import annotations

import logging

import jax
import ml_collections
from etils import epath
from flax import nnx

from cvqcar import checkpoint, fingerprint
from cvqcar.car import model as car_lib
from cvqcar.car import state as car_state
from cvqcar.car import trainer as car_trainer
from cvqcar.tokenizer import export as tokenizer_export


def load_car(path: str) -> tuple[car_lib.CAR, ml_collections.ConfigDict]:
  """A CAR model from an export directory, and its config."""
  config = checkpoint.load_config(path)
  graphdef, abstract = car_trainer.abstract_state(config)
  parts = ("params", "backbone", "frozen")
  restored = checkpoint.restore_export(
      path, {k: getattr(abstract, k) for k in parts})
  return nnx.merge(graphdef, *(restored[k] for k in parts)), config


def export_car(workdir: str, out: str, overwrite: bool = False) -> str:
  """Params-only export of the latest checkpoint in `workdir`, with its
  tokenizer record; a different export at `out` needs `overwrite`."""
  model, config = car_trainer.load_from_workdir(workdir)
  _, params, backbone, frozen = car_state.split(model, config.stage)
  checkpoint.save_export(
      out, config, {"params": params, "backbone": backbone,
                    "frozen": frozen}, overwrite=overwrite)
  rec = fingerprint.read_record(workdir)
  if rec is not None:
    tokenizer_export.write_tokenizer_record(out, rec)
  else:
    logging.warning("%s has no %s (trained before tokenizers were"
                    " recorded): %s cannot be checked against one", workdir,
                    fingerprint.RECORD_FILE, out)
    if jax.process_index() == 0:  # not a replaced export's record
      (epath.Path(out) / fingerprint.RECORD_FILE).unlink(missing_ok=True)
  return out
