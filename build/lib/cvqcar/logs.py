"""Logging setup shared by the command-line entry points."""

from __future__ import annotations

import json
import logging as pylogging
import os
import sys
import time

from absl import logging


class _QuietLibraries(pylogging.Filter):
  """Orbax logs every phase of every save at INFO, and jax each backend it
  probes and does not find ("Unable to initialize backend 'tpu'"): keep
  their warnings only."""

  def filter(self, record):
    if record.levelno >= pylogging.WARNING:
      return True
    return not ("orbax" in record.pathname
                or "Unable to initialize backend" in str(record.msg))


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
          f"  metrics:     {workdir} (TensorBoard event files,"
          f" {METRICS_FILE})\n"
          f"  checkpoints: {os.path.join(workdir, 'checkpoints')}\n"
          f"  export:      python -m cvqcar.export --workdir={workdir}"
          f" --out=exports/{name}")
  if jax.process_index() == 0:
    print(text, flush=True)
  return text


METRICS_FILE = "metrics.jsonl"


class MetricsFile:
  """WORKDIR/metrics.jsonl: every logged scalar as one JSON line per write,
  {"step": N, "train/loss": ...}, readable without TensorFlow (the report
  command reads it). Process 0 rewrites it atomically at each write; a
  resumed run keeps the lines already there."""

  def __init__(self, workdir: str):
    import jax  # noqa: PLC0415

    self.workdir = workdir
    self.enabled = jax.process_index() == 0
    self.lines = []
    if self.enabled:
      path = os.path.join(workdir, METRICS_FILE)
      from etils import epath  # noqa: PLC0415

      if epath.Path(path).exists():
        self.lines = epath.Path(path).read_text().splitlines()

  def write(self, step: int, scalars: dict[str, float]) -> None:
    if not self.enabled:
      return
    from cvqcar import checkpoint  # noqa: PLC0415 (orbax; imported late)

    row = {"step": int(step), **{k: float(v) for k, v in scalars.items()}}
    self.lines.append(json.dumps(row, sort_keys=True))
    checkpoint.write_text(self.workdir, METRICS_FILE,
                          "\n".join(self.lines) + "\n")


def read_metrics(path: str) -> dict[int, dict[str, float]]:
  """step -> {name: value} from a metrics.jsonl; a later line's value for
  the same step and name wins (a resumed run repeats steps)."""
  out: dict[int, dict[str, float]] = {}
  with open(path) as f:
    for number, line in enumerate(f, 1):
      if not line.strip():
        continue
      try:
        row = json.loads(line)
        step = row.pop("step")
        if not isinstance(step, int) or not all(
            isinstance(v, int | float) for v in row.values()):
          raise ValueError("needs an integer step and numeric values")
      except (ValueError, KeyError, AttributeError, TypeError) as e:
        raise ValueError(f"{path}:{number}: not a metrics line ({e}):"
                         f" {line.strip()[:80]!r}") from None
      out.setdefault(step, {}).update(row)
  return out


def write_metrics(out: str, result: dict, markdown: str) -> None:
  """OUT/metrics.json (the result) and OUT/metrics.md (its table), written
  by process 0: what the evaluation commands leave behind."""
  import jax  # noqa: PLC0415 (logs is imported before backends start)

  if jax.process_index() != 0:
    return
  os.makedirs(out, exist_ok=True)
  with open(os.path.join(out, "metrics.json"), "w") as f:
    json.dump(result, f, indent=2, sort_keys=True)
  with open(os.path.join(out, "metrics.md"), "w") as f:
    f.write(markdown)


class Progress:
  """A one-line progress bar on process 0's stderr: batches done, images,
  images per second."""

  def __init__(self, total: int, what: str):
    import jax  # noqa: PLC0415 (logs is imported before backends start)

    self.total, self.what, self.t0 = total, what, time.time()
    self.show = jax.process_index() == 0

  def __call__(self, done: int, images: float) -> None:
    if not self.show:
      return
    rate = images / max(time.time() - self.t0, 1e-9)
    bar = "#" * (30 * done // max(self.total, 1))
    end = "\n" if done == self.total else ""
    sys.stderr.write(f"\r{self.what} [{bar:<30}] {done}/{self.total}"
                     f" batches, {images:.0f} images, {rate:.1f} img/s{end}")
    sys.stderr.flush()
