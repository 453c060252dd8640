"""Codebook argmin: time, FLOP rate and peak memory of each path.

  python bench/argmin.py                       # defaults for the backend
  python bench/argmin.py --shapes=65536x256x16384,65536x256x65536 \
      --impls=reference,xla,pallas --no-write

Defaults: on a GPU/TPU, the paper-scale shapes (N, D, K) in
{(65536, 256, 16384), (65536, 256, 65536), (65536, 1024, 16384)} and the
paths reference, xla, pallas (the fused kernel); on a CPU, the first shape
and reference, xla (the kernel only runs interpreted there).

For every (N, D, K) it times a plain `x @ codebook.T` (the same 2NDK FLOPs),
the matmul followed by a max over each row (the roofline a fused search can
reach, whose ratio it prints for each path) and each argmin path, and reads the
compiled program's memory (arguments + outputs + temporaries) from XLA's
ahead-of-time `memory_analysis()`. Results go to docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from bench import report  # noqa: E402
from cvqcar.kernels import argmin  # noqa: E402


def _matmul(x, codebook):
  return jnp.dot(x, codebook.T, preferred_element_type=jnp.float32,
                 precision=jax.lax.Precision.HIGHEST)


def _matmul_row_max(x, codebook):
  """The roofline of a fused search: the matmul and one reduction of each
  row, what the best search does short of its index bookkeeping."""
  return jnp.max(_matmul(x, codebook), axis=-1)


def _path(impl, block_k):
  if impl == "matmul":
    return _matmul
  if impl == "matmul_max":
    return _matmul_row_max
  return lambda x, cb: argmin.codebook_argmin(x, cb, impl=impl,
                                              block_k=block_k)


def measure(fn, x, codebook, reps):
  """(median seconds, compiled peak bytes, output) of jit(fn)(x, codebook)."""
  compiled = jax.jit(fn).lower(x, codebook).compile()
  mem = compiled.memory_analysis()
  peak = None
  if mem is not None:
    peak = (mem.argument_size_in_bytes + mem.output_size_in_bytes
            + mem.temp_size_in_bytes - getattr(mem, "alias_size_in_bytes", 0))
  out = jax.block_until_ready(compiled(x, codebook))  # warm-up
  times = []
  for _ in range(reps):
    t0 = time.perf_counter()
    jax.block_until_ready(compiled(x, codebook))
    times.append(time.perf_counter() - t0)
  return float(np.median(times)), peak, out


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  accel = jax.default_backend() in ("gpu", "tpu")
  parser.add_argument(
      "--shapes", help="comma-separated NxDxK",
      default="65536x256x16384,65536x256x65536,65536x1024x16384" if accel
      else "65536x256x16384")
  parser.add_argument("--impls", default="reference,xla,pallas" if accel
                      else "reference,xla")
  parser.add_argument("--dtype", default="float32")
  parser.add_argument("--block_k", type=int, default=argmin.DEFAULT_BLOCK_K)
  parser.add_argument("--reps", type=int, default=3)
  parser.add_argument("--no-write", dest="write", action="store_false")
  args = parser.parse_args()

  header = ["N", "D", "K", "path", "time (ms)", "TFLOP/s", "vs matmul",
            "peak memory (MiB)", "vs reference"]
  rows, ratios = [], []
  for shape in args.shapes.split(","):
    n, d, k = (int(v) for v in shape.split("x"))
    kx, kc = jax.random.split(jax.random.key(0))
    x = jax.random.normal(kx, (n, d), args.dtype)
    codebook = jax.random.normal(kc, (k, d), args.dtype)
    flops = 2.0 * n * d * k
    results = {}
    for impl in ["matmul", "matmul_max"] + args.impls.split(","):
      seconds, peak, _ = measure(_path(impl, args.block_k), x, codebook,
                                 args.reps)
      results[impl] = (seconds, peak)
      print(f"{shape} {impl:10s} {seconds * 1e3:10.1f} ms"
            f" {flops / seconds / 1e12:8.3f} TFLOP/s"
            f" peak {peak / 2**20 if peak else float('nan'):10.1f} MiB",
            flush=True)
    base_t = results["matmul"][0]
    ref_peak = results.get("reference", (None, None))[1]
    for impl, (seconds, peak) in results.items():
      rows.append([
          n, d, k, impl, f"{seconds * 1e3:.1f}",
          f"{flops / seconds / 1e12:.3f}", f"{base_t / seconds:.0%}",
          f"{peak / 2**20:.0f}" if peak else "n/a",
          f"{peak / ref_peak:.0%}" if peak and ref_peak else "n/a"])
    for impl in results:
      if impl not in ("matmul", "matmul_max", "reference"):
        ratios.append(f"{shape}: {impl} at"
                      f" {results['matmul_max'][0] / results[impl][0]:.2f}x"
                      " the rate of matmul + row max")
  table = report.markdown_table(header, rows)
  print(table)
  print("\n".join(ratios))
  if args.write:
    note = (f"dtype {args.dtype}, block_k {args.block_k}, median of"
            f" {args.reps} runs after a warm-up. The roofline is the"
            " matmul: every path does the same 2NDK FLOPs, so 'vs matmul' is"
            " the FLOP rate relative to a plain `x @ codebook.T` of the same"
            " shape on the same device (which also writes the full N x K"
            " matrix); 'matmul_max' adds one max over each row, the roofline"
            " a fused search can reach. Every matmul is at"
            " Precision.HIGHEST, as the search's. Peak memory is XLA's"
            " compiled arguments + outputs + temporaries.")
    report.write_section("argmin", f"{note}\n\n{table}\n\n" +
                         "\n".join(f"- {r}" for r in ratios))


if __name__ == "__main__":
  main()
