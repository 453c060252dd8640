"""One process of a two-process tiny training job on localhost.

  python tests/multiprocess_worker.py PORT PROCESS_ID WORKDIR RUN_STEPS \
      [NUM_TRAIN_STEPS]

Prints 'RESULT {step: loss}' for the steps this call trained.
"""

import json
import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from conftest import tiny_config  # noqa: E402

# conftest asks for 8 devices; each of the two processes brings 4 instead.
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"

import jax  # noqa: E402

from cvqcar import distributed  # noqa: E402
from cvqcar.tokenizer import trainer as tokenizer_trainer  # noqa: E402


def main():
  port, process_id, workdir, run_steps = sys.argv[1:5]
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(f"localhost:{port}", num_processes=2,
                             process_id=int(process_id))
  assert jax.device_count() == 8 and jax.local_device_count() == 4
  config = tiny_config()
  config.run_steps = int(run_steps)
  if len(sys.argv) > 5:
    config.num_train_steps = int(sys.argv[5])
    config.checkpoint_every = 1
  summary = tokenizer_trainer.train_and_evaluate(config, workdir)
  losses = {k: v["train/loss"] for k, v in summary.train.items()}
  print("RESULT " + json.dumps(losses), flush=True)
  distributed.finish()


if __name__ == "__main__":
  main()
