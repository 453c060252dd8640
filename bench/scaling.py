"""Train-step time and images/s of the tokenizer on 1, 2, 4, 8 devices.

  python bench/scaling.py                      # tiny and mid, 1/2/4/8 devices
  python bench/scaling.py --sizes=mid --devices=1,8 --steps=10

Each device count runs in a fresh process. On a CPU host the devices are
fake (`--xla_force_host_platform_device_count`): they split the same cores,
so the table shows sharding overhead, not speed-up. On a GPU/TPU host the
counts above the real device count are skipped. Results go to
docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

ROOT = os.path.join(os.path.dirname(__file__), "..")
sys.path.insert(0, ROOT)

SIZES = {
    # The tiny tokenizer at the shape measured in docs/benchmarks.md: 32
    # channel tokens of 16 x 16 (the quick start's now has 256 of 8 x 8).
    "tiny": {"model.latent_channels": 32, "model.channel_mults": (1, 2),
             "model.num_codes": 1024, "batch_size": 32},
    # 64 px, f = 4, 64 channel tokens of 16 x 16, K = 4096.
    "mid": {"model.resolution": 64, "model.base_channels": 64,
            "model.channel_mults": (1, 2, 2), "model.latent_channels": 64,
            "model.num_codes": 4096, "batch_size": 32},
}


def _config(size: str, devices: int):
  from configs import cvq_tokenizer

  config = cvq_tokenizer.get_config("tiny")
  config.update_from_flattened_dict(SIZES[size])
  config.mesh.data = devices
  return config


def worker(size: str, devices: int, steps: int) -> dict:
  """Runs in a child process: times `steps` train steps after a warm-up."""
  import jax

  from cvqcar import sharding
  from cvqcar.data import images as image_data
  from cvqcar.tokenizer import trainer as tokenizer_trainer

  if jax.device_count() < devices:
    return {"skipped": f"{jax.device_count()} devices"}
  config = _config(size, devices)
  mesh = sharding.make_mesh(config, devices=jax.devices()[:devices])
  trainer = tokenizer_trainer.Trainer(config, mesh=mesh)
  state = trainer.init()
  batches = iter(image_data.train_dataset(config))
  cached = [next(batches) for _ in range(2)]  # time the step, not the input
  for i in range(2):  # compile + warm-up
    state, m = trainer.step(state, cached[i % 2])
  jax.block_until_ready(m)
  t0 = time.perf_counter()
  for i in range(steps):
    state, m = trainer.step(state, cached[i % 2])
  jax.block_until_ready(m)
  seconds = (time.perf_counter() - t0) / steps
  return {"step_ms": seconds * 1e3,
          "images_per_s": config.batch_size / seconds,
          "platform": jax.devices()[0].platform,
          "kind": jax.devices()[0].device_kind}


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--sizes", default="tiny,mid")
  parser.add_argument("--devices", default="1,2,4,8")
  parser.add_argument("--steps", type=int, default=10)
  parser.add_argument("--no-write", dest="write", action="store_false")
  parser.add_argument("--worker", help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.worker:
    size, devices = args.worker.split(":")
    print("RESULT " + json.dumps(worker(size, int(devices), args.steps)))
    return

  import jax  # Only to learn the platform; children set their own flags.

  from bench import report

  on_cpu = jax.default_backend() == "cpu"
  rows = []
  for size in args.sizes.split(","):
    for devices in (int(d) for d in args.devices.split(",")):
      env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
      if on_cpu:
        flag = f"--xla_force_host_platform_device_count={devices}"
        env["XLA_FLAGS"] = f"{env.get('XLA_FLAGS', '')} {flag}"
      out = subprocess.run(
          [sys.executable, __file__, f"--worker={size}:{devices}",
           f"--steps={args.steps}"], env=env, cwd=ROOT, capture_output=True,
          text=True, check=False)
      lines = [x for x in out.stdout.splitlines() if x.startswith("RESULT ")]
      if out.returncode or not lines:
        raise RuntimeError(f"{size} on {devices} devices failed:\n"
                           f"{out.stderr[-3000:]}")
      r = json.loads(lines[-1][7:])
      if "skipped" in r:
        print(f"{size} x{devices}: skipped ({r['skipped']})")
        continue
      fake = " (fake)" if r["platform"] == "cpu" else ""
      rows.append([size, f"{devices} x {r['kind']}{fake}",
                   f"{r['step_ms']:.1f}", f"{r['images_per_s']:.1f}"])
      print(" | ".join(rows[-1]), flush=True)
  table = report.markdown_table(
      ["config", "devices", "step (ms)", "images/s"], rows)
  print(table)
  if args.write:
    note = (f"Batch 32, data-parallel mesh over the devices, mean of"
            f" {args.steps} steps after 2 warm-up steps, input batches"
            " cached on the host. 'fake' CPU devices share the host's cores;"
            " one fake device leaves cores idle, so 2+ devices run faster"
            " here. That is core use, not a multi-chip speed-up.")
    report.write_section("scaling", f"{note}\n\n{table}")


if __name__ == "__main__":
  main()
