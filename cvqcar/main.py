"""Entry point: python -m cvqcar.main --config=FILE[:args] --workdir=DIR."""

from __future__ import annotations

import jax  # noqa: E402
from absl import app, flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from cvqcar import (
  logs,  # First: quiets TensorFlow before anything imports it.
  train,  # noqa: E402
)

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Training config file (a get_config(arg) module).",
    lock_config=True)
_WORKDIR = flags.DEFINE_string(
    "workdir", None, "Where checkpoints, metrics and images go.")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  logs.setup()
  logging.info("JAX process %d of %d, %d local / %d global devices (%s)",
               jax.process_index(), jax.process_count(),
               jax.local_device_count(), jax.device_count(),
               jax.devices()[0].platform)
  train.train_and_evaluate(_CONFIG.value, _WORKDIR.value)


if __name__ == "__main__":
  flags.mark_flags_as_required(["config", "workdir"])
  app.run(main)
