"""Per-device memory of the paper's configurations, before a pod is rented.

Runs `launch/compile_check.py` (the sharded train step compiled for N fake
CPU devices) for the tokenizer at 256 px with C = 256 channel tokens and
K = 16,384 / 65,536 codes, and for CAR stage I and II with the 0.6b, 4b and
8b backbones, on 8, 64 and 256 devices (FSDP over all of them), then prints
the table and writes it to docs/benchmarks.md:

  python bench/compile_memory.py            # all rows (~10 min, 2 cores)
  python bench/compile_memory.py --only=car_stage2.py:llm=4b

Buffer sizes are exact; temporaries are the CPU compiler's estimate.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from bench import report  # noqa: E402

ROOT = os.path.join(os.path.dirname(__file__), "..")
# (devices, global batch, device memory GiB: H100 / TPU v4 / TPU v5e)
MESHES = ((8, 64, 80), (64, 256, 32), (256, 256, 16))
CONFIGS = (
    "cvq_tokenizer.py:codes=16384", "cvq_tokenizer.py:codes=65536",
    "car_stage1.py:llm=0.6b", "car_stage2.py:llm=0.6b",
    "car_stage1.py:llm=4b", "car_stage2.py:llm=4b",
    "car_stage1.py:llm=8b", "car_stage2.py:llm=8b",
)


def command(config: str, devices: int, batch: int, gib: float) -> list[str]:
  name, _, arg = config.partition(":")
  flags = [f"--config=configs/{name}" + (f":{arg}" if "codes" not in arg
                                         else ""),
           f"--num_devices={devices}", f"--config.mesh.fsdp={devices}",
           "--config.mesh.data=1", f"--config.batch_size={batch}",
           f"--device_memory_gib={gib:g}"]
  if "codes" in arg:
    flags.append(f"--config.model.num_codes={arg.split('=')[1]}")
  return ["python", "launch/compile_check.py", *flags]


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--only", default="", help="one entry of CONFIGS")
  p.add_argument("--write", action=argparse.BooleanOptionalAction,
                 default=True, help="write docs/benchmarks.md")
  args = p.parse_args(argv)
  configs = [c for c in CONFIGS if not args.only or c == args.only]
  rows = []
  for config in configs:
    for devices, batch, gib in MESHES:
      cmd = command(config, devices, batch, gib)
      with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "memory.json")
        run = subprocess.run([sys.executable, *cmd[1:], f"--json_out={out}"],
                             cwd=ROOT, capture_output=True, text=True)
        if not os.path.exists(out):
          sys.exit(f"{' '.join(cmd)} failed:\n{run.stderr[-3000:]}")
        with open(out) as f:
          r = json.load(f)
      gib_of = lambda b: f"{b / 2**30:.2f}"
      rows.append([f"`{config}`", devices, batch, gib_of(r["argument"]),
                   gib_of(r["temp"]), gib_of(r["peak"]), f"{gib:g}",
                   "yes" if r["fits"] else "**no**", f"{r['compile_s']:.0f}",
                   "`" + " ".join(cmd) + "`"])
      print(" | ".join(str(c) for c in rows[-1][:9]), flush=True)
  table = report.markdown_table(
      ["config", "devices (fsdp)", "batch", "argument GiB", "temp GiB",
       "peak GiB", "device GiB", "fits", "compile s", "command"], rows)
  print(table)
  if args.write:
    note = (
        "Per-device memory of the sharded train step from"
        " `launch/compile_check.py` on fake CPU devices: argument (state and"
        " batch shards; exact), temp (the CPU compiler's estimate of"
        " temporaries), peak = argument + output + temp - alias (the"
        " donated state counted once). CAR keeps float32 master weights and"
        " Adam moments and computes in bfloat16 with full remat (the"
        " configs' defaults); tokenizer rows are the 256 px, C = 256"
        " config with K codes, the PatchGAN and the LPIPS loss the paper"
        " trains with (counted with random VGG16 weights of the real"
        " shapes). The device column is the hardware each mesh stands for:"
        " 8 x 80 GiB an H100 node, 64 x 32 GiB a TPU v4-128 slice (64"
        " chips), 256 x 16 GiB a TPU v5e-256 slice.")
    report.write_section("compile_memory", f"{note}\n\n{table}")


if __name__ == "__main__":
  main()
