"""Params-only export of a training workdir: tokenizer, CAR or DQ-Transformer.

  python -m cvqcar.export --workdir=runs/cvq_tiny --out=exports/cvq_tiny
  python -m cvqcar.export --workdir=runs/car2_tiny --out=exports/car2_tiny

The workdir's saved config names its trainer, which decides the export:
a tokenizer export (EMA weights and codebook) for `load_tokenizer`, a
CAR export (trained and frozen parameters) for `load_car`, or a
DQ-Transformer export (its parameters) for `cvqcar.dq.export.load_dq`.
Exporting the same weights to an existing export is fine; replacing a
different one (another step, a retrained run) needs --overwrite, since runs
made with the old one would no longer match it (they refuse it by
fingerprint).
"""

from __future__ import annotations

from absl import app, flags, logging

from cvqcar import checkpoint, logs
from cvqcar.car import export as car_export
from cvqcar.dq import export as dq_export
from cvqcar.tokenizer import export as tokenizer_export

_WORKDIR = flags.DEFINE_string("workdir", None, "Training workdir to export.")
_OUT = flags.DEFINE_string("out", None, "Export directory.")
_STEP = flags.DEFINE_integer(
    "step", None, "Checkpoint step (latest if unset; tokenizer workdirs).")
_OVERWRITE = flags.DEFINE_bool(
    "overwrite", False, "Replace a different export already at --out.")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  logs.setup()
  trainer = checkpoint.load_config(_WORKDIR.value).get("trainer")
  if trainer == "tokenizer":
    tokenizer_export.export(_WORKDIR.value, _OUT.value, _STEP.value,
                            overwrite=_OVERWRITE.value)
  elif trainer == "car":
    if _STEP.value is not None:
      raise app.UsageError("--step is not supported for CAR workdirs")
    car_export.export_car(_WORKDIR.value, _OUT.value,
                          overwrite=_OVERWRITE.value)
  elif trainer == "dq":
    if _STEP.value is not None:
      raise app.UsageError("--step is not supported for DQ-Transformer"
                           " workdirs")
    dq_export.export_dq(_WORKDIR.value, _OUT.value,
                        overwrite=_OVERWRITE.value)
  else:
    raise app.UsageError(f"{_WORKDIR.value}: its config names trainer"
                         f" {trainer!r}; expected 'tokenizer', 'car' or"
                         " 'dq'")
  logging.info("exported %s (%s) to %s", _WORKDIR.value, trainer, _OUT.value)


if __name__ == "__main__":
  flags.mark_flags_as_required(["workdir", "out"])
  app.run(main)
