"""Train what the config names: python -m cvqcar.train --config=F --workdir=D.

  python -m cvqcar.train --config=configs/cvq_tokenizer.py:tiny \
      --workdir=runs/cvq_tiny
  python -m cvqcar.train --config=configs/car_stage1.py:tiny \
      --workdir=runs/car1_tiny

`config.trainer` picks the trainer: 'tokenizer' (CVQ or a baseline
tokenizer), 'car' (stage I or II text-to-image) or 'dq' (the DQ-Transformer
over a DQ-VAE's tokens). A workdir that already
holds checkpoints is resumed.

Exit status: 0 when the run reached its last step (or config.run_steps);
75 (exit_codes.PREEMPTED) when SIGTERM, SIGINT or a preemption notice
stopped it with a checkpoint at the step reached: rerun the same command
to resume; 130 after a second SIGINT (no checkpoint); 1 on errors, among
them a workdir another live trainer holds (WORKDIR/lock.json).
"""

from __future__ import annotations

import os
import re
import sys

from absl import app, flags
from ml_collections import config_flags

from cvqcar import distributed, exit_codes, logs, workdir_lock
from cvqcar.car import trainer as car_trainer
from cvqcar.dq import trainer as dq_trainer
from cvqcar.tokenizer import trainer as tokenizer_trainer

TRAINERS = {
    "tokenizer": tokenizer_trainer.train_and_evaluate,
    "car": car_trainer.train_and_evaluate,
    "dq": dq_trainer.train_and_evaluate,
}

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Training config file (a get_config(arg) module).",
    lock_config=True)
_WORKDIR = flags.DEFINE_string(
    "workdir", None, "Where checkpoints, metrics and images go.")


def resolve_config_path(path: str) -> str:
  """`path` if it is a file, else `configs/...` from the installed configs
  package (an installed copy run outside the checkout), else `path`."""
  if os.path.isfile(path) or not path.startswith("configs/"):
    return path
  import configs  # noqa: PLC0415 (installed with the package)

  installed = os.path.join(os.path.dirname(configs.__file__),
                           path[len("configs/"):])
  return installed if os.path.isfile(installed) else path


def parse_flags(argv: list[str]) -> list[str]:
  """Parses the flags and loads the config before anything starts; a
  missing config file, an unknown field or a bad value exits with one line
  naming it (absl would print tracebacks). `--config=configs/...` falls
  back to the installed configs package."""
  argv = list(argv)
  for i, arg in enumerate(argv[1:], 1):
    if arg.startswith("--config="):
      spec = arg.split("=", 1)[1]
      path, sep, rest = spec.partition(":")
      path = resolve_config_path(path)
      if not os.path.isfile(path):
        sys.exit(f"train: no config file {path!r} (--config=FILE[:ARGS],"
                 " e.g. configs/cvq_tokenizer.py:tiny)")
      argv[i] = f"--config={path}{sep}{rest}"
  try:
    rest = flags.FLAGS(argv)
    _CONFIG.value  # noqa: B018 (loads the config: its errors surface here)
  except (AttributeError, KeyError) as e:  # an override names no field
    name = str(e).strip("\"'")
    given = [a.split("=", 1)[0] for a in argv
             if a.startswith("--config.") and f".{name}" in a.split("=")[0]]
    sys.exit(f"train: the config has no field {name!r}"
             f" ({', '.join(given) or 'an override'})")
  except (flags.Error, OSError, TypeError, ValueError) as e:
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    if "Traceback" in str(e):  # the config file's own error: its last line
      lines = [lines[0].split(": Error whilst")[0] + ":", lines[-1]]
    message = re.sub(r"\s+", " ", " ".join(lines))
    sys.exit(f"train: {message[:400]}")
  return rest


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
  # The lock first, before a trainer spends minutes reading weights: a
  # second job on a live workdir stops at once (the loop holds it again).
  lock = workdir_lock.WorkdirLock(
      _WORKDIR.value, what=f"{trainer} trainer",
      stale_after_s=config.get("lock_stale_after_s", 600.0))
  try:
    with lock:
      summary = TRAINERS[trainer](config, _WORKDIR.value)
  except workdir_lock.WorkdirLocked as e:
    sys.exit(f"train: {e}")
  distributed.finish()
  if summary.preempted:
    sys.exit(exit_codes.PREEMPTED)


if __name__ == "__main__":
  flags.mark_flags_as_required(["config", "workdir"])
  app.run(main, flags_parser=parse_flags)
