"""Params-only CAR exports: write one from a training workdir, load one.

An export is OUT/config.json plus OUT/params (the trained and frozen
parameters, no optimizer state), which `load_car` turns back into a CAR.
"""

from __future__ import annotations

import os

import ml_collections
import orbax.checkpoint as ocp
from flax import nnx

from cvqcar import checkpoint
from cvqcar.car import model as car_lib
from cvqcar.car import trainer as car_trainer

PARAMS_DIR = "params"


def load_car(path: str) -> tuple[car_lib.CAR, ml_collections.ConfigDict]:
  """A CAR model from an export directory, and its config."""
  config = checkpoint.load_config(path)
  graphdef, abstract = car_trainer.abstract_state(config)
  target = {"params": abstract.params, "frozen": abstract.frozen}
  with ocp.StandardCheckpointer() as loader:
    restored = loader.restore(
        os.path.abspath(os.path.join(path, PARAMS_DIR)), target)
  return nnx.merge(graphdef, restored["params"], restored["frozen"]), config


def export_car(workdir: str, out: str) -> str:
  """Params-only export of the latest checkpoint in `workdir`."""
  model, config = car_trainer.load_from_workdir(workdir)
  _, params, frozen = nnx.split(
      model, car_lib.trainable(config.stage), ...)
  checkpoint.write_config(out, config)
  with ocp.StandardCheckpointer() as saver:
    saver.save(os.path.abspath(os.path.join(out, PARAMS_DIR)),
               {"params": params, "frozen": frozen}, force=True)
  return out
