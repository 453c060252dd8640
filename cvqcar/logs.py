"""Logging setup shared by the command-line entry points."""

from __future__ import annotations

import logging as pylogging
import os

from absl import logging


class _QuietLibraries(pylogging.Filter):
  """Orbax logs every phase of every save at INFO; keep only its warnings."""

  def filter(self, record):
    return record.levelno >= pylogging.WARNING or "orbax" not in record.pathname


def setup() -> None:
  logging.set_verbosity(logging.INFO)
  handler = logging.get_absl_handler()
  if not any(isinstance(f, _QuietLibraries) for f in handler.filters):
    handler.addFilter(_QuietLibraries())


def finished(workdir: str, step: int, what: str,
             scalars: dict[str, float] | None = None) -> str:
  """The end-of-training summary: where images, metrics and checkpoints
  are, and the export command; printed by process 0 and returned."""
  import jax  # noqa: PLC0415 (logs is imported before backends start)

  name = os.path.basename(os.path.normpath(workdir)) or "run"
  shown = ", ".join(f"{k} {v:.4g}" for k, v in sorted((scalars or {}).items()))
  text = (f"{what} finished at step {step}{': ' + shown if shown else ''}\n"
          f"  images:      {os.path.join(workdir, 'images')}\n"
          f"  metrics:     {workdir} (TensorBoard event files)\n"
          f"  checkpoints: {os.path.join(workdir, 'checkpoints')}\n"
          f"  export:      python -m cvqcar.export --workdir={workdir}"
          f" --out=exports/{name}")
  if jax.process_index() == 0:
    print(text, flush=True)
  return text
