"""CAR entry point: python -m cvqcar.car_main --config=FILE --workdir=DIR.

With --export=DIR it instead writes a params-only export of the workdir's
latest checkpoint, which `python -m cvqcar.sample --car=DIR` reads.
"""

from __future__ import annotations

from absl import app, flags, logging
from ml_collections import config_flags

from cvqcar import car_train, distributed, logs

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "CAR config (configs/car_stage1.py or car_stage2.py).",
    lock_config=False)
_WORKDIR = flags.DEFINE_string("workdir", None, "Checkpoints, metrics,"
                               " sample images.")
_EXPORT = flags.DEFINE_string("export", None, "Export the workdir's latest"
                              " checkpoint here and exit.")


def run(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  logs.setup()
  if _EXPORT.value:
    car_train.export_car(_WORKDIR.value, _EXPORT.value)
    logging.info("exported %s to %s", _WORKDIR.value, _EXPORT.value)
    return
  if _CONFIG.value is None:
    raise app.UsageError("--config is required for training")
  distributed.initialize()
  car_train.train_and_evaluate(_CONFIG.value, _WORKDIR.value)


if __name__ == "__main__":
  flags.mark_flags_as_required(["workdir"])
  app.run(run)
