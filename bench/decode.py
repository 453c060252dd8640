"""Decoding speed: CAR with and without its KV cache, Qwen3 vs HF generate.

  python bench/decode.py                       # batches 8, 32, 128; tiny
  python bench/decode.py --batches=4 --channels=64 --reps=5 --no-write
  python bench/decode.py --cfg_scale=1.0       # CAR rows without guidance

At each batch size every row decodes C tokens for each of `batch` prompts
of `prompt_len` ids on the same machine with the same Qwen3 weights: CAR
sampling (`sampling.generate`, with CFG by default) with the KV cache, and
with full recompute at every step (smallest batch only: it is quadratic in
C); a plain greedy Qwen3 decode with our KV cache; and Hugging Face
`transformers` `generate` on those weights written out by `hf_io.to_hf`. An
"image" is C generated tokens. The ratio printed for each batch is our Qwen3
row over the HF row: the like-for-like pair (same trunk, same vocabulary
head, same batch, same new tokens, greedy). Without torch or transformers
the HF rows are skipped with a note. Results go to docs/benchmarks.md.
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

from bench import hf_import, report  # noqa: E402
from cvqcar.car import hf_io, qwen3, sampling  # noqa: E402
from cvqcar.car import model as car_lib  # noqa: E402

CAR_CACHE = "CAR, KV cache"
CAR_RECOMPUTE = "CAR, full recompute"
OURS = "Qwen3, KV cache (ours)"
HF = "HF generate"


def _cpu_threads() -> int:
  """Cores this process may run on: what XLA's CPU client uses."""
  try:
    return len(os.sched_getaffinity(0))
  except AttributeError:  # not Linux
    return os.cpu_count() or 1


def _interleaved_seconds(runs: dict, reps: int) -> dict[str, list[float]]:
  """Wall times of each runs[name]() over `reps` rounds, after one warm-up
  (compile) call each. A round times every decoder once, so load from
  other processes on a shared host falls on all of them alike."""
  for fn in runs.values():
    fn()
  times = {name: [] for name in runs}
  for _ in range(reps):
    for name, fn in runs.items():
      t0 = time.perf_counter()
      fn()
      times[name].append(time.perf_counter() - t0)
  return times


@functools.partial(jax.jit, static_argnames=("graphdef", "steps"))
def greedy_decode(graphdef, state, prompt_bp, steps: int):
  """[B, steps] greedy tokens after prompts [B, P]: prefill, then a scan."""
  model = nnx.merge(graphdef, state)
  b, p = prompt_bp.shape
  cache = model.init_cache(b, p + steps)
  logits, cache = model(prompt_bp, cache=cache)
  first = jnp.argmax(logits[:, -1], -1).astype(jnp.int32)

  def step(carry, _, window):
    token, cache = carry
    logits, cache = model(token[:, None], cache=cache, window=window)
    return (jnp.argmax(logits[:, -1], -1).astype(jnp.int32), cache), token

  # steps - 1 forwards after the prefill, as HF: the last token is not fed;
  # in chunks, each reading the cache slots filled by its end.
  carry, tokens = (first, cache), []
  for n, window in qwen3.decode_windows(p, steps - 1):
    carry, tokens_nb = jax.lax.scan(
        functools.partial(step, window=window), carry, None, length=n)
    tokens.append(tokens_nb)
  return jnp.concatenate(tokens + [carry[0][None]]).T


def car_runner(model, text_bl, mask_bl, args, use_cache: bool):
  graphdef, state = nnx.split(model)
  return lambda: jax.block_until_ready(sampling.generate(
      graphdef, (state,), text_bl, mask_bl, jax.random.key(0),
      temperature=args.temperature, cfg_scale=args.cfg_scale,
      use_cache=use_cache))


def qwen3_runner(backbone, prompt_bp, args):
  graphdef, state = nnx.split(backbone)
  return lambda: np.asarray(jax.block_until_ready(
      greedy_decode(graphdef, state, prompt_bp, args.channels)))


class HFDecoder:
  """transformers' Qwen3ForCausalLM on our weights, greedy `generate`."""

  def __init__(self, torch, transformers, backbone, config, threads: int):
    self.torch = torch
    self.version = transformers.__version__
    torch.set_num_threads(threads)
    transformers.utils.logging.disable_progress_bar()
    self.device = "cuda" if torch.cuda.is_available() else "cpu"
    with tempfile.TemporaryDirectory() as tmp:
      hf_io.to_hf(backbone, config, tmp)
      # Ours computes in config.dtype (bfloat16 from 0.6b up): HF too.
      model = transformers.AutoModelForCausalLM.from_pretrained(
          tmp, dtype=getattr(torch, config.dtype))  # `torch_dtype` < 4.56
    self.model = model.to(self.device).eval()
    self.attention = getattr(model.config, "_attn_implementation", "?")

  def runner(self, prompt_bp, steps: int):
    torch = self.torch
    input_ids = torch.as_tensor(np.array(prompt_bp), device=self.device)
    p = input_ids.shape[1]

    def run():
      with torch.inference_mode():
        out = self.model.generate(
            input_ids, max_new_tokens=steps, min_new_tokens=steps,
            do_sample=False, use_cache=True, pad_token_id=0)
      if self.device == "cuda":
        torch.cuda.synchronize()
      return out[:, p:].cpu().numpy()

    return run


def _batches(text: str) -> list[int]:
  try:
    batches = [int(b) for b in text.split(",") if b.strip()]
  except ValueError:
    batches = []
  if not batches or min(batches) <= 0:
    raise argparse.ArgumentTypeError(
        f"--batches={text!r}; expected positive ints like 8,32,128")
  return batches


def parse_args(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--backbone", default="tiny", choices=list(qwen3.PRESETS))
  parser.add_argument("--batches", type=_batches, default=[8, 32, 128],
                      help="comma-separated prompt batch sizes")
  parser.add_argument("--channels", type=int, default=256,
                      help="C: tokens generated per image")
  parser.add_argument("--codes", type=int, default=1024, help="K")
  parser.add_argument("--code_dim", type=int, default=256,
                      help="codeword dimension (h*w of a channel)")
  parser.add_argument("--prompt_len", type=int, default=16)
  parser.add_argument("--cfg_scale", type=float, default=3.0,
                      help="CAR rows only; 1 = no guidance")
  parser.add_argument("--temperature", type=float, default=0.0,
                      help="CAR rows only; 0 = greedy")
  parser.add_argument("--recompute", action=argparse.BooleanOptionalAction,
                      default=True,
                      help="time CAR with full recompute (smallest batch)")
  parser.add_argument("--hf", action=argparse.BooleanOptionalAction,
                      default=True, help="time HF generate")
  parser.add_argument("--reps", type=int, default=5)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--no-write", dest="write", action="store_false")
  return parser.parse_args(argv)


def measure(args) -> dict:
  """Times every decoder at every batch of args. Returns {'rows': [{'name',
  'batch', 'seconds' (median), 'times'}], 'ratios': {batch: our Qwen3 row
  over HF, median of the per-round ratios, with their min and max},
  'agree': {batch: fraction of greedy ids ours and HF share}, 'distinct',
  'hf' (HFDecoder or None), 'hf_skipped' (why, or None), 'threads',
  'dtype'}."""
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
  threads = _cpu_threads()
  hf, skipped = None, "--no-hf" if not args.hf else None
  if args.hf:
    loaded = hf_import.load()
    if isinstance(loaded, str):
      skipped = loaded
    else:
      hf = HFDecoder(*loaded, backbone, config, threads)
  if skipped:
    print(f"note: HF generate rows skipped: {skipped}", flush=True)

  rows, ratios, agree, distinct = [], {}, {}, {}
  for batch in args.batches:
    # Real ids (0 is HF's pad here), no padding: every row the same length.
    prompt_bp = jax.random.randint(jax.random.key(args.seed + 3),
                                   (batch, args.prompt_len), 1,
                                   config.vocab_size, jnp.int32)
    mask_bp = jnp.ones_like(prompt_bp)
    runs = {CAR_CACHE: car_runner(model, prompt_bp, mask_bp, args, True)}
    if args.recompute and batch == min(args.batches):
      runs[CAR_RECOMPUTE] = car_runner(model, prompt_bp, mask_bp, args,
                                       False)
    runs[OURS] = qwen3_runner(backbone, prompt_bp, args)
    if hf is not None:
      runs[HF] = hf.runner(prompt_bp, args.channels)
    times = _interleaved_seconds(runs, args.reps)
    for name, ts in times.items():
      rows.append({"name": name, "batch": batch,
                   "seconds": float(np.median(ts)), "times": ts})
      print(f"batch {batch:4d}  {name:24s} {np.median(ts):8.3f} s"
            f"  (min {min(ts):.3f}, max {max(ts):.3f})", flush=True)
    if hf is not None:
      per_round = np.array(times[HF]) / np.array(times[OURS])
      ratios[batch] = (float(np.median(per_round)), float(per_round.min()),
                       float(per_round.max()))
      # Greedy on identical weights: the two should pick the same ids (float
      # noise can flip a near-tie and everything after it).
      ours, theirs = runs[OURS](), runs[HF]()
      agree[batch] = float(np.mean(ours == theirs))
      distinct[batch] = len(np.unique(ours))
      print(f"batch {batch:4d}  ours over HF: {ratios[batch][0]:.2f}x"
            f" (rounds {ratios[batch][1]:.2f}..{ratios[batch][2]:.2f}x)",
            flush=True)
  return {"rows": rows, "ratios": ratios, "agree": agree,
          "distinct": distinct, "hf": hf, "hf_skipped": skipped,
          "threads": threads, "dtype": config.dtype}


def table_and_note(args, result: dict) -> tuple[str, str]:
  """(markdown table, the note above it) of measure(args)'s result."""
  hf_seconds = {r["batch"]: r["seconds"] for r in result["rows"]
                if r["name"] == HF}
  header = ["decoder", "batch", "tokens/s per device",
            "images/s per device", "ms per image", "x HF (same batch)"]
  rows = []
  for r in result["rows"]:
    s, b = r["seconds"], r["batch"]
    vs_hf = (f"{hf_seconds[b] / s:.2f}x" if b in hf_seconds else "n/a")
    rows.append([r["name"], b, f"{b * args.channels / s:,.0f}",
                 f"{b / s:.2f}", f"{s * 1e3 / b:.2f}", vs_hf])
  table = report.markdown_table(header, rows)
  decoding = ("greedy" if args.temperature == 0.0 else
              f"temperature {args.temperature}")
  cfg = ("no CFG" if args.cfg_scale == 1.0 else
         f"CFG scale {args.cfg_scale}: each image decodes a conditional and"
         " an unconditional row, so 2 x batch rows")
  hf = result["hf"]
  if hf is None:
    hf_text = f"HF generate not timed: {result['hf_skipped']}."
    ratio_text = "ratio vs HF generate: n/a (HF rows skipped)"
  else:
    import torch  # loaded by hf_import when hf exists

    hf_text = (
        f"HF is transformers {hf.version} `generate(do_sample=False,"
        " use_cache=True)` (its default dynamic KV cache, attention"
        f" `{hf.attention}`) under `torch.inference_mode()` in"
        f" {result['dtype']} (the backbone's compute dtype), torch"
        f" {torch.__version__} on {hf.device}; torch.set_num_threads"
        f"({result['threads']}), the cores XLA's CPU client uses too.")
    checks = ", ".join(
        f"batch {b}: {result['agree'][b]:.1%} ({result['distinct'][b]}"
        " distinct ids)" for b in result["agree"])
    hf_text += f" Check, greedy ids of ours and HF agree: {checks}."
    ratio_text = "ratio vs HF generate (Qwen3 KV cache, ours, over HF" \
        " generate at the same batch; median of per-round ratios, range):\n"
    ratio_text += "\n".join(
        f"- batch {b}: {m:.2f}x ({lo:.2f} to {hi:.2f}x)"
        for b, (m, lo, hi) in result["ratios"].items())
  note = (
      f"`{args.backbone}` Qwen3 backbone, prompts of {args.prompt_len} ids,"
      f" C = {args.channels} tokens per image; median of {args.reps} rounds"
      " after a compile warm-up, each round timing every decoder of a batch"
      " once in turn. CAR rows: `sampling.generate`"
      f" ({decoding}, {cfg}) over K = {args.codes} codes of dimension"
      f" {args.code_dim}; full recompute at the smallest batch only. The"
      " Qwen3 and HF rows decode C greedy tokens over the text vocabulary"
      " with the same weights (ours written out by `hf_io.to_hf`): ours is"
      " one jitted prefill + `lax.scan` with the KV cache. "
      f"{hf_text} An image is C generated tokens; every decoder runs on one"
      " device (JAX's default device; HF on CUDA when torch sees it, else"
      " CPU), so per device is the whole rate. 'x HF' divides HF's time at"
      " the same batch by the row's: like-for-like for the Qwen3 row; for"
      " CAR rows an images/s comparison across different heads.\n\n"
      f"{ratio_text}")
  return table, note


def main(argv=None):
  args = parse_args(argv)
  result = measure(args)
  table, note = table_and_note(args, result)
  print(note.split("\n\n", 1)[-1])
  print(table)
  if args.write:
    report.write_section("decode", f"{note}\n\n{table}")


if __name__ == "__main__":
  main()
