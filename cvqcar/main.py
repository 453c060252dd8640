"""Entry point: python -m cvqcar.main --config=configs/X.py[:args] --workdir=DIR."""

from __future__ import annotations

import logging as pylogging

import jax
from absl import app, flags, logging
from ml_collections import config_flags

from cvqcar import train

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Training config file (a get_config(arg) module).",
    lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Where checkpoints, metrics"
                               " and images go.")
flags.mark_flags_as_required(["config", "workdir"])


class _QuietLibraries(pylogging.Filter):

  def filter(self, record):
    return record.levelno >= pylogging.WARNING or "orbax" not in record.pathname


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  logging.set_verbosity(logging.INFO)
  # Orbax logs every save phase at INFO; keep its warnings, drop the rest.
  logging.get_absl_handler().addFilter(_QuietLibraries())
  logging.info("JAX process %d of %d, %d local / %d global devices (%s)",
               jax.process_index(), jax.process_count(),
               jax.local_device_count(), jax.device_count(),
               jax.devices()[0].platform)
  train.train_and_evaluate(_CONFIG.value, _WORKDIR.value)


if __name__ == "__main__":
  app.run(main)
