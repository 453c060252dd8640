"""Logging setup shared by the command-line entry points."""

from __future__ import annotations

import logging as pylogging

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
