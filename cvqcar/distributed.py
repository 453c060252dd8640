"""Multi-process start-up: jax.distributed from flags or the cluster."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import jax
from absl import app, flags, logging
from jax.experimental import multihost_utils

_COORDINATOR = flags.DEFINE_string(
    "coordinator_address", None, "host:port of process 0, for multi-process"
    " runs outside a cluster JAX detects by itself (TPU pods, Slurm, ...).")
_NUM_PROCESSES = flags.DEFINE_integer(
    "num_processes", None, "Processes in the job (with"
    " --coordinator_address).")
_PROCESS_ID = flags.DEFINE_integer(
    "process_id", None, "This process's rank (with --coordinator_address).")
_CPU_COLLECTIVES = flags.DEFINE_string(
    "cpu_collectives", "gloo", "Cross-process collectives for CPU devices.")


def initialize() -> None:
  """jax.distributed from explicit flags, else from the cluster JAX detects
  (Cloud TPU pods, Slurm, Open MPI, Kubernetes); a plain host stays single."""
  if _COORDINATOR.value:
    if _NUM_PROCESSES.value is None or _PROCESS_ID.value is None:
      raise app.UsageError("--coordinator_address needs --num_processes and"
                           " --process_id")
    jax.config.update("jax_cpu_collectives_implementation",
                      _CPU_COLLECTIVES.value)
    jax.distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value,
                               _PROCESS_ID.value)
  else:
    try:
      jax.distributed.initialize()
    except ValueError:
      # No cluster environment (jax asks for a coordinator address): a
      # single-process job, which is what a laptop or one GPU host runs.
      pass
  logging.info("JAX process %d of %d, %d local / %d global devices (%s)",
               jax.process_index(), jax.process_count(),
               jax.local_device_count(), jax.device_count(),
               jax.devices()[0].platform)


def finish() -> None:
  """Waits for every process, then leaves jax.distributed. A process that
  finishes early would otherwise sit in JAX's shutdown barrier while a slow
  one (a loaded machine, a long checkpoint write) is still working."""
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices("cvqcar: job done")
    jax.distributed.shutdown()


@contextlib.contextmanager
def workers(index: int | None, count: int | None) -> Iterator[tuple[int,
                                                                    int]]:
  """(worker_index, num_workers) for a conversion that splits its inputs.

  Both given, the workers are independent jobs and JAX is left alone.
  Otherwise the process joins the jax.distributed job (`initialize`) and
  takes its process index and count; on success all processes leave
  together (`finish`), since the others would lose the coordinator if
  process 0 exited first.
  """
  if index is not None and count is not None:
    yield index, count
    return
  initialize()
  yield (jax.process_index() if index is None else index,
         jax.process_count() if count is None else count)
  try:
    finish()
  except Exception as e:  # a timeout deep in the collectives' runtime
    raise RuntimeError(
        f"process {jax.process_index()} finished its share, but the job's"
        " other processes did not all reach the end: one of them probably"
        " stopped with an error (see its log); rerun the same command to"
        " resume") from e
