"""Train what the config names: python -m cvqcar.train --config=F --workdir=D.

  python -m cvqcar.train --config=configs/cvq_tokenizer.py:tiny \
      --workdir=runs/cvq_tiny
  python -m cvqcar.train --config=configs/car_stage1.py:tiny \
      --workdir=runs/car1_tiny

`config.trainer` picks the trainer: 'tokenizer' (CVQ or a baseline
tokenizer) or 'car' (stage I or II text-to-image). A workdir that already
holds checkpoints is resumed.
"""

from __future__ import annotations

from absl import app, flags
from ml_collections import config_flags

from cvqcar import distributed, logs
from cvqcar.car import trainer as car_trainer
from cvqcar.tokenizer import trainer as tokenizer_trainer

TRAINERS = {
    "tokenizer": tokenizer_trainer.train_and_evaluate,
    "car": car_trainer.train_and_evaluate,
}

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Training config file (a get_config(arg) module).",
    lock_config=True)
_WORKDIR = flags.DEFINE_string(
    "workdir", None, "Where checkpoints, metrics and images go.")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  config = _CONFIG.value
  trainer = config.get("trainer")
  if trainer not in TRAINERS:
    raise app.UsageError(f"config.trainer must be one of {sorted(TRAINERS)},"
                         f" got {trainer!r}")
  logs.setup()
  distributed.initialize()
  TRAINERS[trainer](config, _WORKDIR.value)
  distributed.finish()


if __name__ == "__main__":
  flags.mark_flags_as_required(["config", "workdir"])
  app.run(main)
