"""Entry point: python -m cvqcar.main --config=FILE[:args] --workdir=DIR."""

from __future__ import annotations

from absl import app, flags
from ml_collections import config_flags

from cvqcar import distributed, logs, train

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Training config file (a get_config(arg) module).",
    lock_config=True)
_WORKDIR = flags.DEFINE_string(
    "workdir", None, "Where checkpoints, metrics and images go.")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  logs.setup()
  distributed.initialize()
  train.train_and_evaluate(_CONFIG.value, _WORKDIR.value)


if __name__ == "__main__":
  flags.mark_flags_as_required(["config", "workdir"])
  app.run(main)
