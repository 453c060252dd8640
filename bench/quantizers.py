"""Every quantizer's forward + backward time and memory, beside the references.

  python bench/quantizers.py                    # the paper's shape
  python bench/quantizers.py --rows=4096 --no-write

One training step's worth of each quantizer on rows x [N, D] (the paper's
channel tokens: N = 65,536 maps of D = 256 numbers, K = 16,384 codes where
a codebook exists; FSQ with the FSQ paper's 15,360-code levels, LFQ / BSQ
with 14 bits): the quantized rows, a loss sum(q * g) + the quantizer's own
losses, and its gradient with respect to the rows (and the codebook where
the gradient trains one). Ours are jitted JAX on the default device, with
XLA's compiled peak memory (arguments + outputs + temporaries). Beside
them, in the same run:
- vector-quantize-pytorch (CPU torch, or CUDA where torch sees it) on the
  same shapes: VectorQuantize (EMA codebook, as our default `vq`), with
  rotation_trick, FSQ, LFQ and LFQ(spherical) for BSQ; its peak is the
  process's resident-memory growth (torch's CPU allocator keeps no count);
- MaskGIT's full-matrix formula in JAX: ||x||^2 - 2 x.e + ||e||^2 over the
  whole [N, K] matrix, argmin, and the lookup as one_hot @ codebook.
The last line is the minimum over our quantizers of the speed-up over the
fastest reference of the same method (IBQ has none).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from bench import report  # noqa: E402
from cvqcar.tokenizer import quantize, residual, scalar  # noqa: E402

FSQ_LEVELS = (8, 8, 8, 6, 5)
RVQ_DEPTH = 4
TORCH_TIMEOUT_S = 600  # a reference step slower than this is a row, not a wait


def ours(name: str, dim: int, codes: int, bits: int):
  """A fresh quantizer of ours."""
  rngs = nnx.Rngs(0)
  if name == "fsq":
    return scalar.FSQ(FSQ_LEVELS, dim, rngs=rngs)
  if name in ("lfq", "bsq"):
    return scalar.LFQ(bits, dim, spherical=name == "bsq", rngs=rngs)
  vq = quantize.VectorQuantizer(
      codes, dim, ema=name in ("vq", "rvq"), rotation=name == "rotation",
      index_backprop=name == "ibq", rngs=rngs)
  return residual.ResidualQuantizer(vq, RVQ_DEPTH) if name == "rvq" else vq


def time_ours(name, x, g, codes, bits, reps):
  module = ours(name, x.shape[1], codes, bits)
  graphdef, state = nnx.split(module)

  def step(state, x, g, key):
    def loss(params, x):
      model = nnx.merge(graphdef, params)
      out = model(x, train=True, key=key)
      return (jnp.sum(out.quantized * g) + out.codebook_loss +
              out.commitment_loss)

    return jax.grad(loss, argnums=(0, 1))(state, x)

  key = jax.random.key(0)
  compiled = jax.jit(step).lower(state, x, g, key).compile()
  mem = compiled.memory_analysis()
  peak = (mem.argument_size_in_bytes + mem.output_size_in_bytes +
          mem.temp_size_in_bytes) if mem is not None else None
  try:
    jax.block_until_ready(compiled(state, x, g, key))
  except jax.errors.JaxRuntimeError as e:  # IBQ's [N, K] matrices at scale
    if "RESOURCE_EXHAUSTED" not in str(e):
      raise
    return None, peak
  times = []
  for _ in range(reps):
    t0 = time.perf_counter()
    jax.block_until_ready(compiled(state, x, g, key))
    times.append(time.perf_counter() - t0)
  return float(np.median(times)), peak


def time_maskgit(x, g, codes, reps):
  """MaskGIT's VQ formula with a straight-through gradient to the rows and
  the codebook loss's to the codebook."""
  codebook = jax.random.normal(jax.random.key(1), (codes, x.shape[1])) * 0.1

  def loss(codebook, x):
    d = (jnp.sum(x ** 2, 1, keepdims=True) - 2 * x @ codebook.T +
         jnp.sum(codebook ** 2, 1)[None])
    one_hot = jax.nn.one_hot(jnp.argmin(d, axis=1), codes)
    q = one_hot @ codebook
    st = x + jax.lax.stop_gradient(q - x)
    return (jnp.sum(st * g) + jnp.mean((q - jax.lax.stop_gradient(x)) ** 2) +
            0.25 * jnp.mean((x - jax.lax.stop_gradient(q)) ** 2))

  fn = jax.jit(jax.grad(loss, argnums=(0, 1)))
  compiled = fn.lower(codebook, x).compile()
  mem = compiled.memory_analysis()
  peak = (mem.argument_size_in_bytes + mem.output_size_in_bytes +
          mem.temp_size_in_bytes) if mem is not None else None
  jax.block_until_ready(compiled(codebook, x))
  times = []
  for _ in range(reps):
    t0 = time.perf_counter()
    jax.block_until_ready(compiled(codebook, x))
    times.append(time.perf_counter() - t0)
  return float(np.median(times)), peak


def _peak_rss_bytes() -> int:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def time_vqp(name, rows, dim, codes, bits, reps):
  """(seconds, peak bytes) of vector-quantize-pytorch's module for `name`,
  measured in a fresh process (its peak resident set past the inputs), or
  None where it has no such module or is not installed."""
  if name not in ("vq", "rotation", "fsq", "lfq", "bsq", "rvq"):
    return None
  cmd = [sys.executable, __file__, f"--torch_only={name}", f"--rows={rows}",
         f"--dim={dim}", f"--codes={codes}", f"--bits={bits}",
         f"--reps={reps}"]
  try:
    proc = subprocess.run(cmd, capture_output=True, text=True,
                          timeout=TORCH_TIMEOUT_S)
  except subprocess.TimeoutExpired:
    why = f"stopped after {TORCH_TIMEOUT_S} s"
    print(f"{name}: vector-quantize-pytorch {why}", flush=True)
    return why
  if proc.returncode != 0:
    why = ("killed (out of memory)" if proc.returncode == -9 else
           f"exit {proc.returncode}: {proc.stderr.strip()[-300:]}")
    print(f"{name}: vector-quantize-pytorch failed, {why}", flush=True)
    return why
  result = json.loads(proc.stdout.strip().splitlines()[-1])
  return (result["seconds"], result["peak"]) if result else None


def _torch_only(name, rows, dim, codes, bits, reps) -> dict | None:
  """The body of time_vqp, run in its own process."""
  try:
    import torch
    import vector_quantize_pytorch as vqp
  except ImportError:
    return None
  rng = np.random.default_rng(0)
  x_np = rng.normal(size=(rows, dim)).astype(np.float32)
  g_np = rng.normal(size=(rows, dim)).astype(np.float32)
  device = "cuda" if torch.cuda.is_available() else "cpu"
  torch.set_num_threads(os.cpu_count() or 1)
  dim = x_np.shape[1]
  if name == "fsq":
    module = vqp.FSQ(levels=list(FSQ_LEVELS), dim=dim)
  elif name in ("lfq", "bsq"):
    module = vqp.LFQ(dim=dim, codebook_size=2 ** bits,
                     spherical=name == "bsq")
  elif name in ("vq", "rotation"):
    module = vqp.VectorQuantize(dim=dim, codebook_size=codes,
                                rotation_trick=name == "rotation")
  elif name == "rvq":  # ours: one shared EMA codebook, straight-through
    module = vqp.ResidualVQ(dim=dim, num_quantizers=RVQ_DEPTH,
                            codebook_size=codes, shared_codebook=True,
                            rotation_trick=False)
  else:
    return None
  module = module.to(device).train()
  x = torch.tensor(x_np, device=device)[None]
  g = torch.tensor(g_np, device=device)[None]

  def step():
    xi = x.clone().requires_grad_(True)
    out = module(xi)
    quantized, losses = out[0], out[-1]
    loss = (quantized * g).sum() + losses.sum()
    loss.backward()
    if device == "cuda":
      torch.cuda.synchronize()

  before = _peak_rss_bytes()
  step()  # warm-up (also builds vqp's caches)
  times = []
  for _ in range(reps):
    t0 = time.perf_counter()
    step()
    times.append(time.perf_counter() - t0)
  return {"seconds": float(np.median(times)),
          "peak": max(_peak_rss_bytes() - before, 0) or None}


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--rows", type=int, default=65536)
  parser.add_argument("--dim", type=int, default=256)
  parser.add_argument("--codes", type=int, default=16384)
  parser.add_argument("--bits", type=int, default=14)
  parser.add_argument("--names",
                      default="vq,rotation,ibq,fsq,lfq,bsq,rvq")
  # (MaskGIT's formula is the plain nearest-code VQ: compared with 'vq'.)
  parser.add_argument("--reps", type=int, default=3)
  parser.add_argument("--no-write", dest="write", action="store_false")
  parser.add_argument("--torch_only", default="", help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.torch_only:
    print(json.dumps(_torch_only(args.torch_only, args.rows, args.dim,
                                 args.codes, args.bits, args.reps)))
    return

  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(args.rows, args.dim)).astype(np.float32))
  g = jnp.asarray(rng.normal(size=(args.rows, args.dim)).astype(np.float32))
  mib = lambda b: f"{b / 2**20:,.0f}" if b else "n/a"
  rows, speedups = [], []
  maskgit = None
  for name in args.names.split(","):
    seconds, peak = time_ours(name, x, g, args.codes, args.bits, args.reps)
    if seconds is None:
      rows.append([name, "cvqcar", "out of memory", mib(peak), ""])
      print(f"{name:9s} ours: out of memory (needs {mib(peak)} MiB)",
            flush=True)
      continue
    refs = {}
    torch_result = time_vqp(name, args.rows, args.dim, args.codes,
                            args.bits, args.reps)
    failed = isinstance(torch_result, str)
    if torch_result and not failed:
      refs["vector-quantize-pytorch"] = torch_result
    if name == "vq":  # the same method: nearest code, straight-through
      maskgit = maskgit or time_maskgit(x, g, args.codes, args.reps)
      refs["MaskGIT formula (JAX)"] = maskgit
    rows.append([name, "cvqcar", f"{seconds * 1e3:,.0f}", mib(peak), ""])
    if failed:
      rows.append([name, "vector-quantize-pytorch", torch_result, "", ""])
    print(f"{name:9s} ours {seconds * 1e3:9.0f} ms  peak {mib(peak)} MiB",
          flush=True)
    for ref, (ref_s, ref_peak) in refs.items():
      rows.append([name, ref, f"{ref_s * 1e3:,.0f}", mib(ref_peak),
                   f"{ref_s / seconds:.2f}x"])
      print(f"{name:9s} {ref} {ref_s * 1e3:9.0f} ms  peak {mib(ref_peak)}"
            f" MiB  reference / ours {ref_s / seconds:.2f}x", flush=True)
    if refs:
      fastest = min(s for s, _ in refs.values())
      speedups.append((fastest / seconds, name))
  table = report.markdown_table(
      ["quantizer", "implementation", "forward + backward (ms)",
       "peak memory (MiB)", "reference time / ours"], rows)
  worst = min(speedups) if speedups else None
  summary = ("minimum speed-up over the fastest reference:"
             f" {worst[0]:.2f}x ({worst[1]})" if worst else
             "minimum speed-up over the fastest reference: n/a")
  print(table)
  print(summary)
  if args.write:
    note = (f"N = {args.rows:,} rows of D = {args.dim}, K = {args.codes:,}"
            f" codes (FSQ levels {FSQ_LEVELS}: {np.prod(FSQ_LEVELS):,}"
            f" codes; LFQ / BSQ {args.bits} bits; rvq: {RVQ_DEPTH} levels of"
            " one shared EMA codebook), float32, median of"
            f" {args.reps} steps after a warm-up. One step: quantize, loss"
            " sum(q * g) + the quantizer's losses, gradient to the rows (and"
            " a gradient-trained codebook). Peak: XLA's compiled arguments +"
            " outputs + temporaries for JAX; the resident-set growth for"
            " torch. vq is our default EMA codebook with dead-code restart,"
            " vector-quantize-pytorch's VectorQuantize its EMA default;"
            " MaskGIT's formula builds the full [N, K] distance matrix and a"
            " one-hot lookup. IBQ has no reference here (vector-quantize-"
            "pytorch has none).")
    section = ("quantizers" if args.rows == 65536 else
               f"quantizers (N = {args.rows:,})")
    if args.names != parser.get_default("names"):  # a subset: its own table
      section += f" ({args.names.replace(',', ', ')})"
    report.write_section(section, f"{note}\n\n{table}\n\n{summary}")


if __name__ == "__main__":
  main()
