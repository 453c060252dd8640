"""One process of a tiny training job, alone or one of several on localhost.

  python tests/multiprocess_worker.py --kind=tokenizer|car|dq \
      --workdir=DIR --steps=N [--num_processes=2 --process_id=I --port=P] \
      [--export=DIR] [--run_steps=K] [--step_sleep=S]

The job has 8 CPU devices in all (8 / num_processes per process). Prints
'STEP n' after each logged train step and 'RESULT {step: loss}' at the end;
exits 75 (exit_codes.PREEMPTED) when a signal stopped it.
"""

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from conftest import tiny_config  # noqa: E402

_ARGS = argparse.ArgumentParser()
_ARGS.add_argument("--kind", required=True,
                   choices=("tokenizer", "car", "dq"))
_ARGS.add_argument("--workdir", required=True)
_ARGS.add_argument("--steps", type=int, required=True)
_ARGS.add_argument("--run_steps", type=int, default=0)
_ARGS.add_argument("--checkpoint_every", type=int, default=1000)
_ARGS.add_argument("--num_processes", type=int, default=1)
_ARGS.add_argument("--process_id", type=int, default=0)
_ARGS.add_argument("--port", type=int, default=0)
_ARGS.add_argument("--export", default="")
_ARGS.add_argument("--step_sleep", type=float, default=0.0)
ARGS = _ARGS.parse_args()

# conftest asks for 8 devices; the processes of a job share 8.
os.environ["XLA_FLAGS"] = ("--xla_force_host_platform_device_count="
                           f"{8 // ARGS.num_processes}")

import jax  # noqa: E402

from configs import car_stage1, dq_transformer  # noqa: E402
from cvqcar import distributed, exit_codes, logs  # noqa: E402


def job_config(kind: str, export: str):
  """The tiny config of each trainer, with 8 devices as data x fsdp."""
  if kind == "tokenizer":
    config = tiny_config()
  elif kind == "car":
    config = car_stage1.get_config("tiny")
    config.tokenizer = tiny_config().model
    config.data.num_eval_examples = 8
    config.sample.prompts = ("a ginger tabby cat",)
  else:
    config = dq_transformer.get_config("tiny")
    config.tokenizer = tiny_config("tiny,dynamic").model
    config.model.update(width=32, position_layers=1, content_layers=1,
                        num_heads=2, num_kv_heads=1, head_dim=16, mlp_dim=64)
    config.data.num_eval_examples = 8
    config.sample.update(prompts=("a ginger tabby cat",), per_prompt=1)
  if kind != "tokenizer":
    config.tokenizer_export = export
    config.mesh.update(data=4, fsdp=2)
  # Evaluated at the end only: the losses are what these jobs compare.
  config.update(batch_size=8, log_every=1, eval_every=1000,
                eval_at_start=False)
  return config


def main():
  logs.setup()
  if ARGS.num_processes > 1:
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(f"localhost:{ARGS.port}",
                               num_processes=ARGS.num_processes,
                               process_id=ARGS.process_id)
  assert jax.device_count() == 8, jax.devices()
  config = job_config(ARGS.kind, ARGS.export)
  config.update(num_train_steps=ARGS.steps, run_steps=ARGS.run_steps,
                checkpoint_every=ARGS.checkpoint_every)

  def on_log(step, total, scalars):
    del total
    if "train/loss" in scalars:
      print(f"STEP {step}", flush=True)
      time.sleep(ARGS.step_sleep)  # room for a signal to land mid-run

  if ARGS.kind == "tokenizer":
    from cvqcar.tokenizer import trainer  # noqa: PLC0415
  elif ARGS.kind == "car":
    from cvqcar.car import trainer  # noqa: PLC0415
  else:
    from cvqcar.dq import trainer  # noqa: PLC0415
  summary = trainer.train_and_evaluate(config, ARGS.workdir, on_log=on_log)
  losses = {k: v["train/loss"] for k, v in summary.train.items()}
  print("RESULT " + json.dumps(losses), flush=True)
  distributed.finish()
  if summary.preempted:
    sys.exit(exit_codes.PREEMPTED)


if __name__ == "__main__":
  main()
