"""Stop requests: SIGTERM, SIGINT and JAX's preemption notice, agreed on a step.

A job asked to stop finishes its current step, saves a checkpoint at a step
every process agrees on, and exits with exit_codes.PREEMPTED.

- Multi-process jobs (jax.distributed): JAX's preemption service catches
  SIGTERM on any process (Cloud TPU maintenance events, Slurm and Kubernetes
  preemption send it) and picks the sync step, the step after the furthest
  any process has reached; `reached(step)` is True at that step on every
  process. SIGINT is turned into a SIGTERM of this process, so Ctrl-C in one
  process's terminal stops the whole job the same way.
- One process without jax.distributed: SIGTERM and SIGINT set a flag read at
  the end of each step.

A second SIGINT exits at once with exit_codes.INTERRUPTED_TWICE (no
checkpoint: for a job stuck in a save or a collective).
"""

from __future__ import annotations

import logging
import os
import signal
import threading

import jax
from jax.experimental import multihost_utils

from cvqcar import exit_codes


def _preemption_service() -> bool:
  """Whether jax.distributed runs its preemption service here (on by
  default: the jax_enable_preemption_service flag)."""
  return jax.distributed.is_initialized() and bool(
      jax.config.jax_enable_preemption_service)


class StopRequest:
  """`with StopRequest() as stop:` ... `if stop.reached(step): save; exit`.

  Every process must call `reached` at every step, from the same first step
  (JAX's sync protocol counts on it)."""

  def __init__(self):
    self.requested = False  # this process was signalled
    self.signal_name = None
    self._interrupts = 0
    self._previous = {}
    self._synced = False

  def __enter__(self) -> StopRequest:
    self._synced = _preemption_service()
    if threading.current_thread() is not threading.main_thread():
      logging.warning("training outside the main thread: SIGTERM/SIGINT"
                      " will not save a checkpoint")
      return self
    wanted = [signal.SIGINT] + ([] if self._synced else [signal.SIGTERM])
    for sig in wanted:
      self._previous[sig] = signal.signal(sig, self._handle)
    return self

  def __exit__(self, *exc) -> None:
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)
    self._previous.clear()

  def _handle(self, signum, frame) -> None:
    del frame
    name = signal.Signals(signum).name
    if signum == signal.SIGINT:
      self._interrupts += 1
      if self._interrupts > 1:
        logging.error("second SIGINT: exiting now, without a checkpoint")
        logging.shutdown()
        os._exit(exit_codes.INTERRUPTED_TWICE)
    if self.requested:
      return
    self.requested, self.signal_name = True, name
    logging.warning("%s received: stopping after this step with a checkpoint"
                    " (SIGINT again to exit at once)", name)
    if self._synced:
      # JAX's notifier listens for SIGTERM and tells every process.
      os.kill(os.getpid(), signal.SIGTERM)

  def reached(self, step: int) -> bool:
    """True at the step where this job saves and stops (the same step on
    every process)."""
    if self._synced:
      if multihost_utils.reached_preemption_sync_point(step):
        self.requested = True
        # JAX's notifier does not say whether a SIGTERM or the platform's
        # maintenance notice woke it.
        self.signal_name = self.signal_name or "SIGTERM or a preemption notice"
        return True
      return False
    return self.requested
