"""Entry point: python -m cvqcar.main --config=FILE[:args] --workdir=DIR."""

from __future__ import annotations

import jax
from absl import app, flags, logging
from ml_collections import config_flags

# logs sorts before train, so it quiets TensorFlow before clu imports it.
from cvqcar import logs, train

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Training config file (a get_config(arg) module).",
    lock_config=True)
_WORKDIR = flags.DEFINE_string(
    "workdir", None, "Where checkpoints, metrics and images go.")
_COORDINATOR = flags.DEFINE_string(
    "coordinator_address", None, "host:port of process 0, for multi-process"
    " runs outside a cluster JAX detects by itself (TPU pods, Slurm, ...).")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None,
                                      "Processes in the job (with"
                                      " --coordinator_address).")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's rank"
                                   " (with --coordinator_address).")
_CPU_COLLECTIVES = flags.DEFINE_string(
    "cpu_collectives", "gloo", "Cross-process collectives for CPU devices.")


def initialize_distributed() -> None:
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
    return
  try:
    jax.distributed.initialize()
  except ValueError as e:
    # No cluster environment: jax asks for a coordinator address.
    logging.info("single process (%s)", e)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  logs.setup()
  initialize_distributed()
  logging.info("JAX process %d of %d, %d local / %d global devices (%s)",
               jax.process_index(), jax.process_count(),
               jax.local_device_count(), jax.device_count(),
               jax.devices()[0].platform)
  train.train_and_evaluate(_CONFIG.value, _WORKDIR.value)


if __name__ == "__main__":
  flags.mark_flags_as_required(["config", "workdir"])
  app.run(main)
