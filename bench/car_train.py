"""CAR stage II train step: step time, tokens/s per device and MFU.

  python bench/car_train.py                        # tiny Qwen3, CPU-sized
  python bench/car_train.py --llm=0.6b --batch=32  # on an accelerator
  python bench/car_train.py --steps=3 --no-write   # a quick look

Runs the real `car.trainer.train_step` (stage II: every parameter trains,
AdamW, fp32 parameters) on pre-tokenized batches of random prompts and
channel tokens over a random codebook, so no tokenizer or data pipeline is
timed. A sequence is prompt + begin-of-image + C channel tokens. MFU counts
6 x (trainable parameters) FLOPs per sequence token (forward and backward
matmuls; attention scores left out, so it is a slight underestimate) against
the device's peak dense bf16 rate, where the device is known. Results go to
docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from bench import report  # noqa: E402
from cvqcar import optim  # noqa: E402
from cvqcar.car import model as car_lib  # noqa: E402
from cvqcar.car import qwen3  # noqa: E402
from cvqcar.car import state as car_state  # noqa: E402

# Peak dense bf16 FLOP/s per device, by jax's device_kind prefix.
PEAK_BF16 = {
    "NVIDIA H100": 989e12,
    "NVIDIA H200": 989e12,
    "NVIDIA A100": 312e12,
    "TPU v4": 275e12,
    "TPU v5 lite": 197e12,
    "TPU v5p": 459e12,
    "TPU v6 lite": 918e12,
}


def peak_flops(device) -> float | None:
  kind = getattr(device, "device_kind", "")
  return next((v for k, v in PEAK_BF16.items() if kind.startswith(k)), None)


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--llm", default="tiny", choices=sorted(qwen3.PRESETS))
  p.add_argument("--batch", type=int, default=8)
  p.add_argument("--remat", default="none",
                 choices=sorted(qwen3.REMAT_POLICIES))
  p.add_argument("--channels", type=int, default=256, help="C tokens")
  p.add_argument("--codes", type=int, default=16384, help="K")
  p.add_argument("--code_dim", type=int, default=256, help="h*w")
  p.add_argument("--text_len", type=int, default=64)
  p.add_argument("--steps", type=int, default=10, help="timed steps")
  p.add_argument("--write", action=argparse.BooleanOptionalAction,
                 default=True, help="write docs/benchmarks.md")
  return p.parse_args(argv)


def stage2_config(llm: str):
  """configs/car_stage2.py at backbone preset `llm`."""
  from configs import car_stage2  # noqa: PLC0415 (ml_collections)

  return car_stage2.get_config(f"llm={llm}")


def build_step(args, config=None):
  """(jitted step, state, batch, key) for one stage-II CAR update; `config`
  (stage2_config(args.llm) when None) is updated by args."""
  config = stage2_config(args.llm) if config is None else config
  config.max_text_len = args.text_len
  config.llm.remat = args.remat
  llm_cfg = car_state.resolve_llm_config(config)
  backbone = qwen3.Qwen3(llm_cfg, rngs=nnx.Rngs(0))
  codebook = jax.random.normal(jax.random.key(1),
                               (args.codes, args.code_dim))
  model = car_lib.CAR(backbone, codebook, args.channels, rngs=nnx.Rngs(2))
  graphdef, params, frozen_backbone, frozen = car_state.split(model, 2)
  tx = optim.make_optimizer(config)
  state = car_state.CarState(
      step=jnp.zeros((), jnp.int32), params=params, backbone=frozen_backbone,
      frozen=frozen, opt_state=tx.init(params))
  keys = jax.random.split(jax.random.key(3), 2)
  vocab = qwen3.PRESETS[args.llm].vocab_size
  batch = {
      "text": jax.random.randint(keys[0], (args.batch, args.text_len), 0,
                                 vocab),
      "text_mask": jnp.ones((args.batch, args.text_len), jnp.int32),
      "tokens": jax.random.randint(keys[1], (args.batch, args.channels), 0,
                                   args.codes),
  }
  # Pre-tokenized batches never reach the tokenizer, so none is given.
  step = jax.jit(functools.partial(
      car_state.train_step, graphdef=graphdef, tok_graphdef=None, tx=tx,
      config=config), donate_argnums=(0,))
  return step, state, batch, jax.random.key(4)


def main(argv=None):
  args = parse_args(argv)
  step, state, batch, key = build_step(args)
  num_params = sum(x.size for x in jax.tree.leaves(state.params))
  t0 = time.perf_counter()
  state, metrics = step(state, batch, key, None)
  jax.block_until_ready(metrics)
  compile_s = time.perf_counter() - t0
  times = []
  for _ in range(args.steps):
    t0 = time.perf_counter()
    state, metrics = step(state, batch, key, None)
    jax.block_until_ready(metrics)
    times.append(time.perf_counter() - t0)
  if not np.isfinite(float(metrics["loss"])):
    raise FloatingPointError(f"non-finite loss {float(metrics['loss'])}")
  seconds = float(np.median(times))
  devices = jax.device_count()
  tokens = args.batch * (args.text_len + 1 + args.channels)
  flops = 6 * num_params * tokens
  peak = peak_flops(jax.devices()[0])
  mfu = f"{flops / seconds / (peak * devices):.1%}" if peak else "n/a"
  header = ["backbone", "params", "batch", "seq (text+1+C)", "K",
            "step ms", "tokens/s/device", "TFLOP/s/device", "MFU"]
  row = [args.llm, f"{num_params / 1e6:.1f}M", args.batch,
         f"{args.text_len}+1+{args.channels}", args.codes,
         f"{seconds * 1e3:.1f}", f"{tokens / seconds / devices:,.0f}",
         f"{flops / seconds / devices / 1e12:.3f}", mfu]
  table = report.markdown_table(header, [row])
  print(table)
  print(f"first step (compile) {compile_s:.1f} s; median of {args.steps}"
        " steps after it")
  if args.write:
    note = (
        "CAR stage II step (`car.trainer.train_step`: every parameter"
        " trains, AdamW on fp32 parameters, pre-tokenized batches, random"
        f" weights), median of {args.steps} steps after a compile step"
        f" ({compile_s:.1f} s). MFU = 6 x trainable parameters x sequence"
        " tokens / step time / peak dense bf16 FLOP/s of the device (n/a"
        " where the peak is unknown, e.g. a CPU); attention-score FLOPs"
        " are left out.")
    report.write_section(f"car_train ({args.llm})", f"{note}\n\n{table}")


if __name__ == "__main__":
  main()
