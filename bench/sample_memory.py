"""Per-device memory of CAR's sampler for the paper's backbones.

Runs `launch/compile_check.py --job=sample` (prefill and all C decoding
steps with classifier-free guidance, compiled for N fake CPU devices, on
bfloat16 weights with a bfloat16 KV cache) for the 0.6b, 4b and 8b
backbones on 1, 8 (FSDP) and 64 (FSDP 8 x model 8) devices at 16, 64 and
256 prompts, then prints the table and writes it to docs/benchmarks.md:

  python bench/sample_memory.py                 # 27 compiles
  python bench/sample_memory.py --only=8b --budget_s=600

Buffer sizes are exact; temporaries are the CPU compiler's estimate. With
--budget_s, rows not started within the budget are listed as not run.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from bench import report  # noqa: E402

ROOT = os.path.join(os.path.dirname(__file__), "..")
PRESETS = ("0.6b", "4b", "8b")
# (devices, mesh flags, device memory GiB: one H100; TPU v5e slices)
MESHES = (
    (1, ("--config.mesh.data=1",), 80),
    (8, ("--config.mesh.data=1", "--config.mesh.fsdp=8"), 16),
    (64, ("--config.mesh.data=1", "--config.mesh.fsdp=8",
          "--config.mesh.model=8"), 16),
)
BATCHES = (16, 64, 256)


def command(preset: str, devices: int, mesh: tuple[str, ...], batch: int,
            gib: float) -> list[str]:
  return ["python", "launch/compile_check.py", "--job=sample",
          f"--config=configs/car_stage2.py:llm={preset}",
          f"--num_devices={devices}", *mesh, f"--config.batch_size={batch}",
          f"--device_memory_gib={gib:g}"]


def mesh_name(mesh: tuple[str, ...]) -> str:
  axes = [f.split(".")[-1] for f in mesh if not f.endswith("=1")]
  return " x ".join(axes) or "one device"


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--only", default="", help="one preset of PRESETS")
  p.add_argument("--budget_s", type=float, default=0.0,
                 help="start no compile after this many seconds (0: all)")
  p.add_argument("--write", action=argparse.BooleanOptionalAction,
                 default=True, help="write docs/benchmarks.md")
  args = p.parse_args(argv)
  if args.only and args.only not in PRESETS:
    sys.exit(f"--only must be one of {PRESETS}, got {args.only!r}")
  presets = [x for x in PRESETS if not args.only or x == args.only]
  rows, missing, t0 = [], [], time.perf_counter()
  gib_of = lambda b: f"{b / 2**30:.2f}"
  for preset in presets:
    for devices, mesh, gib in MESHES:
      for batch in BATCHES:
        cmd = command(preset, devices, mesh, batch, gib)
        head = [f"`{preset}`", devices, mesh_name(mesh), batch]
        if args.budget_s and time.perf_counter() - t0 > args.budget_s:
          missing.append(" ".join(cmd))
          continue
        with tempfile.TemporaryDirectory() as tmp:
          out = os.path.join(tmp, "memory.json")
          run = subprocess.run(
              [sys.executable, *cmd[1:], f"--json_out={out}"], cwd=ROOT,
              capture_output=True, text=True)
          if not os.path.exists(out):
            sys.exit(f"{' '.join(cmd)} failed:\n{run.stderr[-3000:]}")
          with open(out) as f:
            r = json.load(f)
        rows.append([*head, gib_of(r["argument"]),
                     gib_of(r["kv_cache_per_device"]), gib_of(r["temp"]),
                     gib_of(r["peak"]), f"{gib:g}",
                     "yes" if r["fits"] else "**no**",
                     f"{r['compile_s']:.0f}", "`" + " ".join(cmd) + "`"])
        print(" | ".join(str(c) for c in rows[-1][:10]), flush=True)
  table = report.markdown_table(
      ["llm", "devices", "mesh", "prompts", "argument GiB", "KV cache GiB",
       "temp GiB", "peak GiB", "device GiB", "fits", "compile s",
       "command"], rows)
  print(table)
  if missing:
    print(f"not run (past --budget_s={args.budget_s:g}):", *missing,
          sep="\n  ")
  if args.write:
    note = (
        "Per-device memory of CAR's sampler (`sampling.generate`: prefill"
        " of [prompt][begin-of-image] and C = 256 decoding steps, cfg_scale"
        " 3, so 2 rows a prompt) from `launch/compile_check.py --job=sample`"
        " on fake CPU devices (stage II config: every weight in the tree):"
        " argument (bfloat16 weight and prompt shards; exact), KV cache"
        " (its per-device share, 256 text + 1 + 256 slots in bfloat16; part"
        " of temp), temp (the CPU compiler's estimate of temporaries: it"
        " computes bfloat16 in float32, through float32 copies of the"
        " stacked weights and of the cache that a TPU or GPU does without,"
        " so it errs high), peak = argument + output + temp + unread (the"
        " 8b's untied lm_head: held, never read by the sampler).")
    if missing:
      note += ("\n\nNot run (the run's --budget_s ran out):\n\n" +
               "\n".join(f"- `{c}`" for c in missing))
    report.write_section("sample_memory", f"{note}\n\n{table}")


if __name__ == "__main__":
  main()
