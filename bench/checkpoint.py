"""Checkpoint cost: train steps with and without an Orbax save in flight.

  python bench/checkpoint.py                         # tiny and mid
  python bench/checkpoint.py --configs=tiny --steps=5 --saves=1 --no-write

Runs the tokenizer trainer (`tokenizer.trainer.Trainer`: its `init` and
`step`, on batches from `data.images.train_dataset`) with the training
loop's `checkpoint.Checkpointer` in a temporary workdir. Per config it
measures the median step time with no save in flight, and `--saves` times
over: a save followed at once by `wait()` (the time `save` takes to return,
its blocking part, and the time `wait` then takes to commit), and a save
followed by train steps until Orbax reports it finished (the median step
time while a save is in flight). Steps are timed to
`jax.block_until_ready` of the new state, with the batch already drawn. A
warm-up save (directory set-up) is left out. `tiny` is
configs/cvq_tokenizer.py:tiny; `mid` is the same with 128 base channels
(13M parameters), so the save has some weight. Results go to
docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from bench import report  # noqa: E402
from configs import cvq_tokenizer  # noqa: E402
from cvqcar import checkpoint  # noqa: E402
from cvqcar.data import images as image_data  # noqa: E402
from cvqcar.tokenizer import trainer as tokenizer_trainer  # noqa: E402

# Name -> overrides of configs/cvq_tokenizer.py:tiny.
CONFIGS = {"tiny": {}, "mid": {"base_channels": 128}}


def make_config(name: str):
  config = cvq_tokenizer.get_config("tiny")
  for field, value in CONFIGS[name].items():
    config.model[field] = value
  return config


def _timed_step(trainer, state, batch):
  t0 = time.perf_counter()
  state, metrics = trainer.step(state, batch)
  jax.block_until_ready((state, metrics))
  return state, time.perf_counter() - t0


def measure(name: str, steps: int, saves: int) -> dict:
  config = make_config(name)
  trainer = tokenizer_trainer.Trainer(config)
  train_iter = iter(image_data.train_dataset(config))
  state = trainer.init()
  num_params = sum(x.size for x in jax.tree.leaves(state.params))
  state_bytes = sum(x.nbytes for x in jax.tree.leaves(state))
  for _ in range(2):  # compile, then one more to settle
    state, _ = _timed_step(trainer, state, next(train_iter))
  plain = []
  for _ in range(steps):
    state, seconds = _timed_step(trainer, state, next(train_iter))
    plain.append(seconds)
  print(f"{name}: {num_params / 1e6:.1f}M parameters, step"
        f" {np.median(plain) * 1e3:.0f} ms without a save", flush=True)
  blocking, commit, in_flight, per_save = [], [], [], []
  with tempfile.TemporaryDirectory() as workdir:
    ckpt = checkpoint.Checkpointer(workdir, config)
    ckpt.save(int(state.step), state, train_iter, force=True)  # warm-up
    ckpt.wait()
    for _ in range(saves):
      # A save, then at once its commit: nothing else competes.
      state, _ = _timed_step(trainer, state, next(train_iter))
      t0 = time.perf_counter()
      ckpt.save(int(state.step), state, train_iter, force=True)
      t1 = time.perf_counter()
      ckpt.wait()
      blocking.append(t1 - t0)
      commit.append(time.perf_counter() - t1)
      # A save with training going on until it has committed.
      state, _ = _timed_step(trainer, state, next(train_iter))
      ckpt.save(int(state.step), state, train_iter, force=True)
      n = 0
      while ckpt.manager.is_saving_in_progress() and n < steps:
        batch = next(train_iter)
        state, seconds = _timed_step(trainer, state, batch)
        in_flight.append(seconds)
        n += 1
      ckpt.wait()
      per_save.append(n)
      print(f"{name}: save blocks {blocking[-1] * 1e3:.0f} ms, commits in"
            f" {commit[-1] * 1e3:.0f} ms; {n} steps during a save",
            flush=True)
    is_async = ckpt.manager._options.enable_async_checkpointing  # noqa: SLF001
  median = lambda xs: f"{np.median(xs) * 1e3:.0f}" if xs else "n/a"
  return {
      "row": [name, f"{num_params / 1e6:.1f}M",
              f"{state_bytes / 2**20:.0f}", median(plain), median(in_flight),
              f"{np.median(per_save):.0f}" if per_save else "0",
              median(blocking), median(commit)],
      "async": is_async,
  }


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--configs", default="tiny,mid",
                      help=f"comma-separated, of {sorted(CONFIGS)}")
  parser.add_argument("--steps", type=int, default=10,
                      help="timed steps without a save; the most timed"
                      " during one save")
  parser.add_argument("--saves", type=int, default=3,
                      help="timed saves of each kind")
  parser.add_argument("--write", action=argparse.BooleanOptionalAction,
                      default=True, help="write docs/benchmarks.md")
  args = parser.parse_args(argv)
  names = args.configs.split(",")
  unknown = sorted(set(names) - set(CONFIGS))
  if unknown:
    parser.error(f"unknown config(s) {unknown}; known: {sorted(CONFIGS)}")
  results = [measure(name, args.steps, args.saves) for name in names]
  header = ["config", "params", "state MiB", "step ms, no save",
            "step ms, save in flight", "steps per save", "save() blocks ms",
            "wait() commits ms"]
  table = report.markdown_table(header, [r["row"] for r in results])
  print(table)
  if not args.write:
    return
  modes = {r["async"] for r in results}
  mode = ("asynchronous (Orbax's default, enable_async_checkpointing=True:"
          " `save` returns once the arrays are copied off the device and a"
          " background thread writes and commits them)" if modes == {True}
          else "NOT asynchronous (enable_async_checkpointing is off: `save`"
          " itself writes and commits)")
  note = (
      "Tokenizer trainer (`Trainer.step` on `train_dataset` batches) with"
      " `checkpoint.Checkpointer` (train state: parameters, EMA, Adam"
      " moments, codebook buffers; plus the Grain iterator) writing to a"
      " local temporary directory. `tiny` is configs/cvq_tokenizer.py:tiny"
      " (32 px, batch 8); `mid` the same with"
      " --config.model.base_channels=128. Step times: median over"
      f" {args.steps} steps without a save and over the steps run while a"
      " save was in flight (at most"
      f" {args.steps} per save; 'steps per save' is their median count);"
      f" save and commit times: median of {args.saves} saves each, after a"
      f" warm-up save. Saves here are {mode}. On this CPU the background"
      " write competes with the step for the same cores.")
  report.write_section("checkpoint", f"{note}\n\n{table}")


if __name__ == "__main__":
  main()
