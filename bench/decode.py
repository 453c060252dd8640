"""Decoding speed: CAR with and without its KV cache, Qwen3 vs HF generate.

  python bench/decode.py                       # batch 8, C = 256, tiny
  python bench/decode.py --batch=4 --channels=64 --reps=5 --no-write
  python bench/decode.py --cfg_scale=3.0       # CAR rows with guidance

Every row decodes C tokens for each of `batch` prompts of `prompt_len` ids
on the same machine with the same Qwen3 weights: CAR sampling
(`sampling.generate`) with the KV cache and with full recompute at every step;
a plain greedy Qwen3 decode with our KV cache; and Hugging Face
`transformers` `generate` on those weights written out by `hf_io.to_hf`. An
"image" is C generated tokens. The speedup printed last is our Qwen3 row
over the HF row (the like-for-like pair: same trunk, same vocabulary head).
Results go to docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from bench import report  # noqa: E402
from cvqcar.car import hf_io, qwen3, sampling  # noqa: E402
from cvqcar.car import model as car_lib  # noqa: E402


def _median_seconds(fn, reps: int) -> float:
  """Median wall time of fn() over `reps` calls, after one warm-up call."""
  fn()  # compile + warm-up
  times = []
  for _ in range(reps):
    t0 = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t0)
  return float(np.median(times))


@functools.partial(jax.jit, static_argnames=("graphdef", "steps"))
def greedy_decode(graphdef, state, prompt_bp, steps: int):
  """[B, steps] greedy tokens after prompts [B, P]: prefill, then a scan."""
  model = nnx.merge(graphdef, state)
  b, p = prompt_bp.shape
  cache = model.init_cache(b, p + steps)
  logits, cache = model(prompt_bp, cache=cache)
  first = jnp.argmax(logits[:, -1], -1).astype(jnp.int32)

  def step(carry, _):
    token, cache = carry
    logits, cache = model(token[:, None], cache=cache)
    return (jnp.argmax(logits[:, -1], -1).astype(jnp.int32), cache), token

  # steps - 1 forwards after the prefill, as HF: the last token is not fed.
  (last, _), tokens_tb = jax.lax.scan(step, (first, cache), None,
                                      length=steps - 1)
  return jnp.concatenate([tokens_tb.T, last[:, None]], axis=1)


def time_car(model, text_bl, mask_bl, args, use_cache: bool) -> float:
  graphdef, state = nnx.split(model)
  run = lambda: jax.block_until_ready(sampling.generate(
      graphdef, (state,), text_bl, mask_bl, jax.random.key(0),
      temperature=args.temperature, cfg_scale=args.cfg_scale,
      use_cache=use_cache))
  return _median_seconds(run, args.reps)


def time_qwen3(backbone, prompt_bp, args) -> tuple[float, np.ndarray]:
  graphdef, state = nnx.split(backbone)
  run = lambda: jax.block_until_ready(
      greedy_decode(graphdef, state, prompt_bp, args.channels))
  return _median_seconds(run, args.reps), np.asarray(run())


def time_hf(backbone, config, prompt_bp, args):
  """(median seconds, tokens [B, C], torch device, torch threads)."""
  import torch
  import transformers

  torch.set_num_threads(os.cpu_count())
  transformers.utils.logging.disable_progress_bar()
  device = "cuda" if torch.cuda.is_available() else "cpu"
  with tempfile.TemporaryDirectory() as tmp:
    hf_io.to_hf(backbone, config, tmp)
    # Ours computes in config.dtype (bfloat16 from 0.6b up): HF too.
    model = transformers.AutoModelForCausalLM.from_pretrained(
        tmp, dtype=getattr(torch, config.dtype))  # `torch_dtype` before 4.56
  model = model.to(device).eval()
  input_ids = torch.as_tensor(np.array(prompt_bp), device=device)
  p = input_ids.shape[1]

  def run():
    with torch.inference_mode():
      out = model.generate(input_ids, max_new_tokens=args.channels,
                           min_new_tokens=args.channels, do_sample=False,
                           use_cache=True, pad_token_id=0)
    if device == "cuda":
      torch.cuda.synchronize()
    return out

  seconds = _median_seconds(run, args.reps)
  tokens = run()[:, p:].cpu().numpy()
  return seconds, tokens, device, torch.get_num_threads()


def parse_args(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--backbone", default="tiny", choices=list(qwen3.PRESETS))
  parser.add_argument("--batch", type=int, default=8)
  parser.add_argument("--channels", type=int, default=256,
                      help="C: tokens generated per image")
  parser.add_argument("--codes", type=int, default=1024, help="K")
  parser.add_argument("--code_dim", type=int, default=256,
                      help="codeword dimension (h*w of a channel)")
  parser.add_argument("--prompt_len", type=int, default=16)
  parser.add_argument("--cfg_scale", type=float, default=1.0,
                      help="CAR rows only; 1 = no guidance")
  parser.add_argument("--temperature", type=float, default=0.0,
                      help="CAR rows only; 0 = greedy")
  parser.add_argument("--recompute", action=argparse.BooleanOptionalAction,
                      default=True, help="time CAR with full recompute too")
  parser.add_argument("--reps", type=int, default=5)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--no-write", dest="write", action="store_false")
  return parser.parse_args(argv)


def measure(args) -> dict:
  """Times every decoder of args: {'seconds': {row: s}, 'agree': fraction
  of greedy ids ours and HF share, 'distinct', 'device', 'threads'}."""
  config = qwen3.PRESETS[args.backbone]
  if args.prompt_len + args.channels + 1 > config.max_position_embeddings:
    raise ValueError(
        f"--prompt_len={args.prompt_len} + --channels={args.channels} + 1"
        f" exceeds max_position_embeddings="
        f"{config.max_position_embeddings} of --backbone={args.backbone}")
  backbone = qwen3.Qwen3(config, rngs=nnx.Rngs(args.seed))
  codebook_kd = jax.random.normal(jax.random.key(args.seed + 1),
                                  (args.codes, args.code_dim))
  model = car_lib.CAR(backbone, codebook_kd, args.channels,
                      rngs=nnx.Rngs(args.seed + 2))
  # Real ids (0 is HF's pad here), no padding: every row has the same length.
  prompt_bp = jax.random.randint(jax.random.key(args.seed + 3),
                                 (args.batch, args.prompt_len), 1,
                                 config.vocab_size, jnp.int32)
  mask_bp = jnp.ones_like(prompt_bp)

  seconds = {}
  seconds["CAR, KV cache"] = time_car(model, prompt_bp, mask_bp, args, True)
  print(f"CAR KV cache        {seconds['CAR, KV cache']:8.3f} s", flush=True)
  if args.recompute:
    seconds["CAR, full recompute"] = time_car(model, prompt_bp, mask_bp,
                                              args, False)
    print(f"CAR full recompute  {seconds['CAR, full recompute']:8.3f} s",
          flush=True)
  seconds["Qwen3, KV cache (ours)"], ours = time_qwen3(backbone, prompt_bp,
                                                       args)
  print(f"Qwen3 KV cache      {seconds['Qwen3, KV cache (ours)']:8.3f} s",
        flush=True)
  seconds["HF generate"], theirs, device, threads = time_hf(
      backbone, config, prompt_bp, args)
  print(f"HF generate         {seconds['HF generate']:8.3f} s", flush=True)
  # Greedy on identical weights: the two decodes should pick the same ids
  # (float noise can flip a near-tie and everything after it).
  return {"seconds": seconds, "agree": float(np.mean(ours == theirs)),
          "distinct": len(np.unique(ours)), "device": device,
          "threads": threads, "dtype": config.dtype}


def table_and_note(args, result: dict) -> tuple[str, str]:
  """(markdown table, the note above it) of measure(args)'s result."""
  import torch
  import transformers

  seconds = result["seconds"]
  # A small random tied model tends to repeat one id: count the distinct ids
  # so a trivial agreement reads as such.
  check = (f"greedy tokens of ours and HF agree on {result['agree']:.1%}"
           f" ({result['distinct']} distinct ids)")
  header = ["decoder", "tokens/s", "images/s", "ms per image", "batch", "C"]
  rows = []
  for name, s in seconds.items():
    rows.append([name, f"{args.batch * args.channels / s:,.0f}",
                 f"{args.batch / s:.2f}", f"{s * 1e3 / args.batch:.1f}",
                 args.batch, args.channels])
  table = report.markdown_table(header, rows)
  speedup = seconds["HF generate"] / seconds["Qwen3, KV cache (ours)"]
  decoding = ("greedy" if args.temperature == 0.0 else
              f"temperature {args.temperature}")
  cfg = ("no CFG" if args.cfg_scale == 1.0 else
         f"CFG scale {args.cfg_scale} (doubles the decoded batch)")
  note = (
      f"`{args.backbone}` Qwen3 backbone, batch {args.batch}, prompts of"
      f" {args.prompt_len} ids, C = {args.channels} tokens per image;"
      f" median of {args.reps} runs after a compile warm-up. CAR rows:"
      f" `sampling.generate` ({decoding}, {cfg}) over K = {args.codes} codes"
      f" of dimension {args.code_dim}. The Qwen3 and HF rows decode C"
      " greedy tokens over the text vocabulary with the same weights (ours"
      " written out by `hf_io.to_hf`): ours is one jitted prefill +"
      " `lax.scan` with the KV cache; HF is transformers"
      f" {transformers.__version__} `generate(do_sample=False,"
      f" use_cache=True)` under `torch.inference_mode()` in {result['dtype']}"
      f" (the backbone's compute dtype), torch {torch.__version__} on"
      f" {result['device']} with"
      f" `torch.set_num_threads({result['threads']})` (os.cpu_count()). An"
      " image is C generated tokens. JAX rows run on JAX's default device"
      " (the GPU on a GPU host); HF runs on CUDA when torch sees it, else"
      f" CPU. Check: {check}.\n\n"
      f"speedup vs HF generate: {speedup:.2f}x (Qwen3 KV cache, ours, over"
      " HF generate)")
  return table, note


def main(argv=None):
  args = parse_args(argv)
  result = measure(args)
  table, note = table_and_note(args, result)
  print(note.split("Check: ")[-1])
  print(table)
  if args.write:
    report.write_section("decode", f"{note}\n\n{table}")


if __name__ == "__main__":
  main()
