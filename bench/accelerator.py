"""Every accelerator figure in one command: argmin, CAR step, decode, tokenizer.

  python bench/accelerator.py               # one H100/H200 or a TPU VM
  python bench/accelerator.py --parts=argmin,decode
  python bench/accelerator.py --smoke       # toy sizes on a CPU, writes nothing
  python bench/accelerator.py --smoke --out=/tmp/benchmarks.md

Each part writes its own section of docs/benchmarks.md (or --out):

  argmin     the codebook search paths, bf16 and fp32 inputs: the fused
             Pallas kernel where the platform has one (Mosaic GPU on sm_90,
             Mosaic TPU), the blocked XLA scan and the reference, each
             checked against the reference (bench/argmin.py's timing)
  car_step   a CAR stage II train step at the 0.6b preset: step time,
             tokens/s per device, MFU (bench/car_train.py's step)
  decode     CAR and Qwen3 decoding against Hugging Face `generate` on the
             same 0.6b weights (bench/decode.py)
  tokenizer  a 256 px CVQ tokenizer train step (cvqcar.tokenizer.trainer):
             step time, images/s per device

It needs jax, flax, optax and orbax (torch and transformers for decode) and
none of TensorFlow, clu, grain or ml_collections, so it runs on a stock GPU
image: the few config fields the steps read are built here as plain
mappings (`stage2_config`, `tokenizer_config`), which
tests/accelerator_bench_test.py checks against configs/. Each part has a
time budget (--budget_s): once spent, the part stops timing and skips what
is left of its list (a compile in flight runs to its end). The last line is
`RESULT {json}`; the exit status is 1 when a correctness check failed.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from bench import argmin as argmin_bench  # noqa: E402
from bench import car_train, decode, report  # noqa: E402
from cvqcar import perf, sharding  # noqa: E402
from cvqcar.kernels import argmin  # noqa: E402
from cvqcar.tokenizer import trainer as tokenizer_trainer  # noqa: E402

PARTS = ("argmin", "car_step", "decode", "tokenizer")
# Seconds per part; compiles dominate on an accelerator (< 8 min in all).
BUDGET_S = {"argmin": 80, "car_step": 90, "decode": 150, "tokenizer": 90}
# Distances of a path's codes may exceed the reference's by this much
# (relative) where the indices differ: a near-tie, not a wrong code.
TIE_RTOL = 1e-4


class Config(dict):
  """A mapping read as attributes: the stand-in for ml_collections'
  ConfigDict in the few fields a train step reads."""

  def __getattr__(self, name):
    try:
      return self[name]
    except KeyError:
      raise AttributeError(name) from None

  def __setattr__(self, name, value):
    self[name] = value


def stage2_config(llm: str) -> Config:
  """configs/car_stage2.py:llm=LLM, the fields a stage-II step reads."""
  return Config(
      stage=2, seed=0, max_text_len=256, cfg_drop_prob=0.1,
      num_train_steps=100_000,
      llm=Config(preset=llm, hf_dir="", dtype="", param_dtype="float32",
                 remat="full", scan_layers=True, attention="auto"),
      optimizer=Config(learning_rate=2e-5, warmup_steps=1000, b1=0.9,
                       b2=0.96, weight_decay=1e-3, grad_clip=1.0))


def tokenizer_config(smoke: bool) -> Config:
  """configs/cvq_tokenizer.py (256 px; 'tiny,smoke' when smoke), the fields
  the tokenizer Trainer reads. batch_size is set by the caller."""
  model = Config(
      resolution=256, base_channels=128, channel_mults=(1, 1, 2, 2, 4),
      num_res_blocks=2, norm_groups=32, latent_channels=256,
      quantize="channel", num_codes=16_384, nested_dropout_alpha=0.25,
      codebook=Config(cosine=False, simvq=False, ema=True, ema_decay=0.99,
                      restart_fraction=0.03, init_scale=0.1,
                      argmin_impl="auto"),
      dynamic=Config(fine_fraction=0.5, temperature=1.0))
  loss = Config(
      reconstruction="l2", reconstruction_weight=5.0, quantization_weight=5.0,
      beta=0.25, budget_weight=100.0, perceptual_weight=1.0,
      perceptual_weights="", gan_weight=0.75, gan_start_step=20_000,
      disc_base_channels=64, disc_num_layers=3)
  optimizer = Config(learning_rate=1e-4, disc_learning_rate=1e-4,
                     warmup_steps=5_000, b1=0.9, b2=0.99, weight_decay=1e-4,
                     grad_clip=1.0)
  config = Config(
      seed=0, model=model, loss=loss, optimizer=optimizer, ema_decay=0.999,
      num_train_steps=500_000,
      mesh=Config(data=-1, fsdp=1, model=1),
      dcn_mesh=Config(data=1, fsdp=1, model=1),
      logical_axis_rules=(("conv_in", "fsdp"), ("conv_out", "model"),
                          ("codes", "model"), ("code_dim", "fsdp"),
                          ("norm", None)))
  if smoke:  # 'tiny,smoke': 16 px, 8 channel tokens of 8 x 8, no GAN
    model.update(resolution=16, base_channels=8, channel_mults=(1, 2),
                 num_res_blocks=1, norm_groups=4, latent_channels=8,
                 num_codes=64)
    loss.update(gan_weight=0.0, perceptual_weight=0.0)
    optimizer.update(learning_rate=1e-3, disc_learning_rate=1e-3,
                     warmup_steps=50, weight_decay=0.0)
    config.update(ema_decay=0.99, num_train_steps=6)
  return config


class Deadline:
  """A part's time budget."""

  def __init__(self, seconds: float):
    self.seconds, self.t0 = seconds, time.perf_counter()

  def elapsed(self) -> float:
    return time.perf_counter() - self.t0

  def spent(self) -> bool:
    return self.elapsed() > self.seconds


def _timed_steps(run, steps: int, deadline: Deadline) -> list[float]:
  """Wall seconds of up to `steps` calls of run() (at least two)."""
  times = []
  while len(times) < steps and (len(times) < 2 or not deadline.spent()):
    t0 = time.perf_counter()
    run()
    times.append(time.perf_counter() - t0)
  return times


def _gap(x, codebook, idx_n, ref_n) -> tuple[int, float]:
  """(rows whose index differs, largest relative excess of their squared
  distance over the reference's), in fp32 without a matmul (no TF32)."""
  x_nd, cb_kd = x.astype(jnp.float32), codebook.astype(jnp.float32)
  dist = lambda i: jnp.sum(jnp.square(x_nd - cb_kd[i]), axis=-1)
  d_ref, d = dist(ref_n), dist(idx_n)
  excess = jnp.max((d - d_ref) / jnp.maximum(d_ref, 1e-30))
  return int(jnp.sum(idx_n != ref_n)), max(float(excess), 0.0)


def run_argmin(smoke: bool, deadline: Deadline) -> dict:
  shapes = ([(512, 32, 1024)] if smoke else
            [(65536, 256, 16384), (65536, 256, 65536), (65536, 1024, 16384)])
  impls = ["reference", "xla"]
  kernel = argmin.default_impl() == "pallas"
  if kernel or smoke:  # on a CPU the kernel runs interpreted (a check)
    impls.append("pallas")
  reps = 1 if smoke else 5
  header = ["N", "D", "K", "dtype", "path", "time (ms)", "TFLOP/s",
            "vs matmul", "peak memory (MiB)", "rows differing",
            "max distance excess", "check"]
  rows, ok, skipped = [], True, []
  for n, d, k in shapes:  # both dtypes of a shape before the next shape
    for dtype in ("bfloat16", "float32"):
      if deadline.spent():
        skipped.append(f"{n}x{d}x{k} {dtype}")
        continue
      kx, kc = jax.random.split(jax.random.key(0))
      x = jax.random.normal(kx, (n, d), dtype)
      codebook = jax.random.normal(kc, (k, d), dtype)
      flops = 2.0 * n * d * k
      results = {}
      for impl in ["matmul"] + impls:
        results[impl] = argmin_bench.measure(
            argmin_bench._path(impl, argmin.DEFAULT_BLOCK_K), x, codebook,
            reps)
      ref_n = results["reference"][2]
      base_s = results["matmul"][0]
      for impl, (seconds, peak, out) in results.items():
        check = ["", "", "n/a"]
        if impl != "matmul":
          differ, excess = _gap(x, codebook, out, ref_n)
          passed = differ == 0 or excess <= TIE_RTOL
          ok &= passed
          check = [differ, f"{excess:.1e}", "ok" if passed else "FAIL"]
        rows.append([n, d, k, dtype, impl, f"{seconds * 1e3:.2f}",
                     f"{flops / seconds / 1e12:.3f}",
                     f"{base_s / seconds:.0%}",
                     f"{peak / 2**20:.0f}" if peak else "n/a", *check])
        print(f"  {n}x{d}x{k} {dtype:8s} {impl:9s} {seconds * 1e3:9.2f} ms"
              f" {check[-1]}", flush=True)
  platform = jax.devices()[0].platform
  path = ("the fused kernel: Mosaic GPU on sm_90, Mosaic TPU on a TPU"
          if kernel else "the TPU kernel in the Pallas interpreter (a check;"
          " its time means nothing)" if "pallas" in impls else
          "no kernel on this platform")
  note = (f"Codebook search on {platform}, median of {reps} runs after a"
          " warm-up. 'pallas' is " + path + "; 'xla' the blocked scan"
          f" (block_k {argmin.DEFAULT_BLOCK_K}); 'matmul' a plain"
          " `x @ codebook.T` of the same 2NDK FLOPs (the roofline). Check:"
          " each path's indices against the reference's; where they differ"
          " the fp32 squared distance of the chosen code may exceed the"
          f" reference's by at most {TIE_RTOL:g} relative (a tie).")
  if skipped:
    note += f" Skipped (budget): {', '.join(skipped)}."
  return {"rows": len(rows), "ok": ok, "name": "accelerator: argmin",
          "body": f"{note}\n\n{report.markdown_table(header, rows)}"}


def run_car_step(smoke: bool, deadline: Deadline) -> dict:
  config = stage2_config("tiny" if smoke else "0.6b")
  flags = (["--llm=tiny", "--batch=2", "--text_len=8", "--channels=16",
            "--codes=64", "--code_dim=16", "--remat=none", "--steps=2"]
           if smoke else
           ["--llm=0.6b", "--batch=32", f"--text_len={config.max_text_len}",
            "--channels=256", "--codes=16384", "--code_dim=256",
            f"--remat={config.llm.remat}", "--steps=10"])
  args = car_train.parse_args(flags + ["--no-write"])
  step, state, batch, key = car_train.build_step(args, config)
  num_params = sum(x.size for x in jax.tree.leaves(state.params))
  t0 = time.perf_counter()
  compiled = step.lower(state, batch, key, None).compile()
  compile_s = time.perf_counter() - t0
  box = {"state": state}

  def run():
    box["state"], box["metrics"] = compiled(box["state"], batch, key, None)
    jax.block_until_ready(box["metrics"])

  run()  # the first step: allocation and autotuning
  times = _timed_steps(run, args.steps, deadline)
  loss = float(box["metrics"]["loss"])
  # build_step's jit is not sharded: the step runs on one device however
  # many the host has.
  seconds, devices = float(np.median(times)), 1
  tokens = args.batch * (args.text_len + 1 + args.channels)
  flops = perf.compiled_flops(compiled)  # per device, as compiled
  model_flops = 6 * num_params * tokens / devices
  peak = perf.peak_flops(perf.device_kind())
  rate = lambda f: f"{f / seconds / peak:.1%}" if f and peak else "n/a"
  header = ["backbone", "params", "batch", "seq (text+1+C)", "remat",
            "step ms", "tokens/s/device", "XLA TFLOP/s/device", "MFU (XLA)",
            "MFU (6N)"]
  row = [args.llm, f"{num_params / 1e6:.1f}M", args.batch,
         f"{args.text_len}+1+{args.channels}", args.remat,
         f"{seconds * 1e3:.1f}", f"{tokens / seconds / devices:,.0f}",
         f"{flops / seconds / 1e12:.3f}" if flops else "n/a", rate(flops),
         rate(model_flops)]
  note = (
      "CAR stage II step (`car.state.train_step`: every parameter trains,"
      " AdamW on fp32 parameters, pre-tokenized random batches, random"
      f" weights, K = {args.codes}) on one device, median of {len(times)}"
      " steps after the"
      f" compile ({compile_s:.1f} s) and one more step. MFU (XLA) = XLA's"
      " FLOP count of the compiled step (`perf.compiled_flops`; with remat"
      " it includes the recomputed forward) / step time / the device's"
      " dense bf16 peak (`perf.peak_flops`; n/a where unknown, e.g. a CPU);"
      " MFU (6N) counts 6 x parameters per token instead (bench/"
      f"car_train.py). Loss after the steps: {loss:.3f}.")
  return {"rows": 1, "ok": bool(np.isfinite(loss)),
          "name": f"accelerator: car_step ({args.llm})",
          "body": f"{note}\n\n{report.markdown_table(header, [row])}"}


def run_decode(smoke: bool, deadline: Deadline) -> dict:
  del deadline  # three reps of each decoder fit the default budget
  flags = (["--backbone=tiny", "--batches=2", "--channels=8", "--codes=64",
            "--code_dim=16", "--prompt_len=4", "--reps=1"] if smoke else
           ["--backbone=0.6b", "--batches=8,32,128", "--channels=256",
            "--codes=16384", "--code_dim=256", "--prompt_len=16", "--reps=3"])
  args = decode.parse_args(flags + ["--no-write"])
  result = decode.measure(args)
  table, note = decode.table_and_note(args, result)
  return {"rows": len(result["rows"]), "ok": True,
          "name": f"accelerator: decode ({args.backbone})",
          "body": f"{note}\n\n{table}"}


def run_tokenizer(smoke: bool, deadline: Deadline,
                  batch_per_device: int) -> dict:
  config = tokenizer_config(smoke)
  devices = jax.device_count()
  config.batch_size = batch_per_device * devices
  trainer = tokenizer_trainer.Trainer(config)
  state = trainer.init()
  res, batch_size = config.model.resolution, config.batch_size
  rng = np.random.default_rng(0)
  local = {"image": rng.uniform(-1, 1, (batch_size, res, res, 3)).astype(
      np.float32), "skipped": np.zeros((batch_size,), np.int32)}
  batch = sharding.global_batch(local, trainer.mesh)  # on device once
  box = {"state": state}

  def run():
    with jax.set_mesh(trainer.mesh):
      box["state"], box["metrics"] = trainer.train_step(
          box["state"], batch, trainer.step_key, trainer.perceptual)
    jax.block_until_ready(box["metrics"])

  t0 = time.perf_counter()
  run()
  compile_s = time.perf_counter() - t0
  times = _timed_steps(run, 2 if smoke else 8, deadline)
  loss = float(box["metrics"]["loss"])
  seconds = float(np.median(times))
  m = config.model
  num_params = sum(x.size for x in jax.tree.leaves(box["state"].params))
  gan = "on" if config.loss.gan_weight > 0 else "off"
  header = ["resolution", "tokens", "K", "params", "batch/device", "GAN",
            "step ms", "images/s/device"]
  side = m.resolution // 2 ** (len(m.channel_mults) - 1)
  row = [m.resolution, f"{m.latent_channels} of {side}x{side}", m.num_codes,
         f"{num_params / 1e6:.1f}M", batch_per_device, gan,
         f"{seconds * 1e3:.1f}", f"{batch_per_device / seconds:,.1f}"]
  note = (
      "CVQ tokenizer train step (`tokenizer.trainer.Trainer.train_step`:"
      " generator, EMA and, with the GAN on, the discriminator update; the"
      " GAN loss is weighted 0 before its start step but computed), random"
      " images already on device, codebook search"
      f" '{argmin.default_impl()}'; LPIPS off (no weights given). Median of"
      f" {len(times)} steps after the first ({compile_s:.1f} s with the"
      f" compile) on {devices} device(s). Loss: {loss:.3f}.")
  return {"rows": 1, "ok": bool(np.isfinite(loss)),
          "name": f"accelerator: tokenizer ({m.resolution} px)",
          "body": f"{note}\n\n{report.markdown_table(header, [row])}"}


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--parts", default=",".join(PARTS),
                 help=f"comma-separated subset of {','.join(PARTS)}")
  p.add_argument("--smoke", action="store_true",
                 help="toy sizes (a CPU check); writes only to --out")
  p.add_argument("--out", default="",
                 help="the markdown file to write (default"
                 " docs/benchmarks.md; with --smoke none)")
  p.add_argument("--budget_s", default="",
                 help="per-part seconds, e.g. decode=240,argmin=60"
                 f" (defaults {BUDGET_S})")
  p.add_argument("--tokenizer_batch", type=int, default=16,
                 help="images per device in the tokenizer step")
  args = p.parse_args(argv)
  args.parts = [s for s in args.parts.split(",") if s]
  unknown = sorted(set(args.parts) - set(PARTS))
  if unknown:
    p.error(f"--parts: unknown {unknown}; known: {list(PARTS)}")
  budgets = dict(BUDGET_S)
  for item in filter(None, args.budget_s.split(",")):
    name, _, value = item.partition("=")
    if name not in PARTS or not value:
      p.error(f"--budget_s: expected PART=SECONDS with PART in"
              f" {list(PARTS)}, got {item!r}")
    budgets[name] = float(value)
  args.budgets = budgets
  return args


def main(argv=None) -> int:
  args = parse_args(argv)
  doc = args.out or (None if args.smoke else report.DOC)
  size = "smoke" if args.smoke else "full"
  print(f"accelerator bench ({size}) on {report.machine()}", flush=True)
  summary = {}
  for name in args.parts:
    deadline = Deadline(args.budgets[name])
    print(f"[{name}] start (budget {deadline.seconds:.0f} s)", flush=True)
    if name == "tokenizer":
      part = run_tokenizer(args.smoke, deadline, 2 if args.smoke
                           else args.tokenizer_batch)
    else:
      part = globals()[f"run_{name}"](args.smoke, deadline)
    seconds = deadline.elapsed()
    print(part["body"].split("\n\n")[-1])
    if doc:
      report.write_section(part["name"], part["body"], doc)
    over = " (over budget)" if deadline.spent() else ""
    print(f"[{name}] {part['rows']} rows, checks"
          f" {'passed' if part['ok'] else 'FAILED'}, {seconds:.1f} s{over}",
          flush=True)
    summary[name] = {"rows": part["rows"], "ok": part["ok"],
                     "seconds": round(seconds, 1)}
  print("RESULT " + json.dumps(summary), flush=True)
  return 0 if all(p["ok"] for p in summary.values()) else 1


if __name__ == "__main__":
  sys.exit(main())
