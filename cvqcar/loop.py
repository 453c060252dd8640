"""The training loop of every trainer: steps, logs, guards, eval, checkpoints.

A trainer (tokenizer, CAR, DQ-Transformer) supplies a `Task`: how to make
its state, its jitted step, its evaluation and its data. `run` does the rest
the same way for all of them:

- holds the workdir (cvqcar.workdir_lock) for the whole run;
- resumes from the latest checkpoint, on any number of processes (below);
- steps from state.step + 1 to config.num_train_steps (or config.run_steps
  further), compiling the step once ahead of time for its FLOP count;
- every config.log_every steps writes the mean train metrics and perf/*
  (step time, examples and tokens/s per device, TFLOP/s per device, MFU)
  to TensorBoard, WORKDIR/metrics.jsonl and `on_log`, and stops on a
  non-finite loss naming the steps;
- evaluates at step 0 (unless config.eval_at_start is False), every
  config.eval_every and at the end;
- checkpoints (async) every config.checkpoint_every and at the stop;
- on SIGTERM/SIGINT or JAX's preemption notice (cvqcar.preemption) saves
  at the step every process agrees on, waits for the save to commit and
  returns a Summary with preempted=True (`python -m cvqcar.train` then
  exits with exit_codes.PREEMPTED, 75);
- config.profile_steps = "A:B" traces steps A..B into WORKDIR/profile.

Data position and elastic resume: a checkpoint records the global number of
examples consumed (`examples`), the example its pipeline started at, the
process count and the global batch size. Resumed on the same process count
and batch size, the Grain iterator state is restored as saved (exact, even
past corrupt records). Otherwise (P processes -> P', or another batch size)
the pipeline restarts at global example `examples`, each new process
reading its block of every global batch from there
(cvqcar.data.images.records_pipeline): no example is seen twice or skipped,
but for records dropped as corrupt.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import ml_collections
import numpy as np
from clu import metric_writers, periodic_actions
from etils import epath

from cvqcar import (
  checkpoint,
  exit_codes,
  logs,
  perf,
  preemption,
  sharding,
  wandb_writer,
)
from cvqcar import workdir_lock as lock_lib


@dataclasses.dataclass
class Task:
  """What a trainer supplies to `run`.

  init() -> a fresh state (sharded); restore_target: the abstract (with
  shardings) of what a checkpoint holds; from_saved(restored) -> state and
  to_saved(state) -> what is saved (the identity unless part of the state,
  like CAR's frozen backbone, is not checkpointed); step: the jitted
  step(state, global_batch, *step_args) -> (state, metrics dict with
  'loss'); evaluate(step, state, writer) -> eval scalars (it writes its
  own images, to files and to the clu `writer`);
  train_data(start_example) -> the Grain training dataset.
  """

  what: str  # "tokenizer", "CAR stage 1", ...: names the run in messages
  mesh: Any
  init: Callable[[], Any]
  restore_target: Any
  step: Any
  step_args: tuple
  evaluate: Callable[[int, Any, Any], dict[str, float]]
  train_data: Callable[[int], Any]
  from_saved: Callable[[Any], Any] = lambda saved: saved
  to_saved: Callable[[Any], Any] = lambda state: state
  sections: tuple[str, ...] = ("model",)  # config parts a resume must match
  tokens_per_example: int | None = None  # sequence tokens (perf/tokens_*)
  summed: tuple[str, ...] = ()  # metrics logged as sums, not means
  finish_keys: tuple[str, ...] | None = None  # eval keys in the last line
  on_start: Callable[[], None] | None = None  # after the lock is taken
  # refresh(state) -> state, before each eval and checkpoint: state a step
  # does not keep current (the DQ-VAE's eval thresholds).
  refresh: Callable[[Any], Any] | None = None


# Written by a run stopped with a checkpoint, removed when the next starts:
# launchers that cannot trust the exit status alone (srun's, when it kills
# the processes that are still exiting) look for it.
PREEMPTED_FILE = "preempted.json"


class Summary(NamedTuple):
  """What one call of `run` saw: logged train scalars per step (the last
  1,000 steps), the last eval scalars, the last step and whether it
  stopped for a signal or a preemption notice."""

  train: dict[int, dict[str, float]]
  eval: dict[str, float]
  last_step: int
  preempted: bool = False


_SUMMARY_STEPS = 1000


def parse_profile_steps(spec: str) -> tuple[int, int] | None:
  """'20:25' -> (20, 25); '' -> None."""
  if not spec:
    return None
  try:
    first, last = (int(x) for x in str(spec).split(":"))
  except ValueError:
    first = last = -1
  if not 0 < first <= last:
    raise ValueError(f"config.profile_steps must be 'FIRST:LAST' with"
                     f" 0 < FIRST <= LAST, got {spec!r}")
  return first, last


class _Data:
  """The training iterator and the global data position it stands for."""

  def __init__(self, task: Task, batch_size: int, start_step: int,
               position: dict | None = None, ckpt=None):
    self.batch_size, self.start_step = batch_size, start_step
    processes = jax.process_count()
    if position is None:
      self.pipeline_start = self.start_examples = start_step * batch_size
      self.iter = iter(task.train_data(self.pipeline_start))
      return
    self.start_examples = int(position["examples"])
    if (position.get("process_count") == processes
        and position.get("batch_size") == batch_size):
      self.pipeline_start = int(position["pipeline_start"])
      self.iter = iter(task.train_data(self.pipeline_start))
      ckpt.restore_data(start_step, self.iter)
    else:
      logging.info(
          "checkpoint of step %d was written by %s process(es) with global"
          " batch %s; resuming on %d with batch %d from global example %d",
          start_step, position.get("process_count"),
          position.get("batch_size"), processes, batch_size,
          self.start_examples)
      self.pipeline_start = self.start_examples
      self.iter = iter(task.train_data(self.pipeline_start))

  def position(self, step: int) -> dict:
    return {"examples": self.start_examples + (step - self.start_step)
            * self.batch_size, "pipeline_start": self.pipeline_start,
            "process_count": jax.process_count(),
            "batch_size": self.batch_size, "step": step}


def _restore(task: Task, ckpt, config) -> tuple[Any, _Data]:
  step = ckpt.latest_step()
  if step is None:
    state = task.init()
    return state, _Data(task, config.batch_size, int(state.step))
  position = ckpt.position(step)
  if position is None:  # an older checkpoint: its Grain state fits no more
    position = {"examples": step * config.batch_size}
  state = task.from_saved(ckpt.restore(task.restore_target, step=step))
  return state, _Data(task, config.batch_size, step, position, ckpt)


def run(config: ml_collections.ConfigDict, workdir: str, task: Task,
        on_log=None) -> Summary:
  """Trains `task` in `workdir` (see the module docstring).
  `on_log(step, num_train_steps, scalars)` sees every logged set of train
  or eval scalars (e.g. cvqcar.figures.LiveProgress)."""
  lock = lock_lib.WorkdirLock(
      workdir, what=task.what,
      stale_after_s=config.get("lock_stale_after_s", 600.0))
  with lock, preemption.StopRequest() as stop:
    marker = epath.Path(workdir) / PREEMPTED_FILE
    if jax.process_index() == 0:
      marker.unlink(missing_ok=True)
    if task.on_start is not None:
      task.on_start()
    ckpt = checkpoint.Checkpointer(workdir, config, sections=task.sections)
    state, data = _restore(task, ckpt, config)
    summary = _train(config, workdir, task, ckpt, state, data, stop, on_log)
    ckpt.wait()
    if summary.preempted and jax.process_index() == 0:
      checkpoint.write_text(workdir, PREEMPTED_FILE, json.dumps(
          {"step": summary.last_step, "signal": stop.signal_name,
           "time": time.time()}))
  if summary.preempted:
    logging.warning("%s stopped by %s at step %d: checkpoint saved in %s;"
                    " rerun the same command to resume (exit status %d)",
                    task.what, stop.signal_name, summary.last_step, workdir,
                    exit_codes.PREEMPTED)
  else:
    keys = task.finish_keys
    logs.finished(workdir, summary.last_step, f"{task.what} training", {
        k: v for k, v in summary.eval.items() if keys is None or k in keys})
  return summary


def _train(config, workdir, task: Task, ckpt, state, data: _Data,
           stop: preemption.StopRequest, on_log) -> Summary:
  """The steps, writing to TensorBoard (clu) and, with config.wandb.project,
  to Weights & Biases too (cvqcar.wandb_writer; process 0)."""
  writer = metric_writers.create_default_writer(
      workdir, just_logging=jax.process_index() > 0)
  mirror = wandb_writer.create(config, workdir, jax.process_index())
  if mirror is not None:
    writer = metric_writers.MultiWriter([writer, mirror])
  try:
    return _train_steps(config, workdir, task, ckpt, state, data, stop,
                        on_log, writer)
  finally:
    if mirror is not None:
      mirror.close()


def _train_steps(config, workdir, task: Task, ckpt, state, data: _Data,
                 stop: preemption.StopRequest, on_log, writer) -> Summary:
  metrics_file = logs.MetricsFile(workdir)
  start, total = int(state.step), config.num_train_steps
  end = min(total, start + config.run_steps) if config.run_steps else total
  progress = periodic_actions.ReportProgress(
      num_train_steps=total, writer=writer, every_steps=config.log_every)
  profile = parse_profile_steps(config.get("profile_steps", ""))
  summary = Summary(train={}, eval={}, last_step=start)

  def log(step, scalars):
    writer.write_scalars(step, scalars)
    metrics_file.write(step, scalars)
    if on_log is not None:
      on_log(step, total, scalars)

  refreshed = None  # the step whose state `refresh` saw last

  def refresh(step):
    nonlocal state, refreshed
    if task.refresh is not None and refreshed != step:
      state, refreshed = task.refresh(state), step

  def evaluate(step):
    refresh(step)
    summary.eval.clear()
    summary.eval.update(task.evaluate(step, state, writer))
    log(step, summary.eval)

  if start == 0 and config.get("eval_at_start", True):
    evaluate(0)
  step_fn, meter, tracing = None, None, False
  history, first, step, preempted = [], start + 1, start, False
  for step in range(start + 1, end + 1):
    batch = sharding.global_batch(next(data.iter), task.mesh)
    with jax.set_mesh(task.mesh):
      if step_fn is None:
        step_fn, meter = _compile(config, task, state, batch)
      if profile and not tracing and profile[0] <= step <= profile[1]:
        tracing = _start_trace(workdir)  # (a resumed run starts inside)
      state, m = step_fn(state, batch, *task.step_args)
    meter.step()
    if tracing and (step == profile[1] or step == end):
      with meter.pause():
        jax.block_until_ready(state)
        jax.profiler.stop_trace()
      tracing = False
    history.append(m)
    progress(step)
    preempted = stop.reached(step)
    last = step == end or preempted
    if step % config.log_every == 0 or last:
      history = jax.device_get(history)
      _check_finite(history, first, task.what)
      for i, h in enumerate(history):
        summary.train[first + i] = {f"train/{k}": float(v)
                                    for k, v in h.items()}
      while len(summary.train) > _SUMMARY_STEPS:
        summary.train.pop(next(iter(summary.train)))
      scalars = {f"train/{k}": float(np.mean([h[k] for h in history]))
                 for k in history[0]}
      for k in task.summed:
        if f"train/{k}" in scalars:
          scalars[f"train/{k}"] *= len(history)
      scalars.update(meter.read())
      log(step, scalars)
      history, first = [], step + 1
    with meter.pause():
      if (step % config.eval_every == 0 or step == total) and not preempted:
        evaluate(step)
      if step % config.checkpoint_every == 0 or last:
        refresh(step)
        ckpt.save(step, task.to_saved(state), data.iter, force=last,
                  position=data.position(step))
    if preempted:
      if tracing:
        jax.profiler.stop_trace()
      break
  writer.flush()
  return summary._replace(last_step=step, preempted=preempted)


def _compile(config, task: Task, state, batch):
  """The step compiled ahead of time (one compile, and its FLOP count) and
  the throughput meter."""
  t0 = time.time()
  compiled = task.step.lower(state, batch, *task.step_args).compile()
  flops = perf.compiled_flops(compiled)
  logging.info("%s step compiled in %.1fs: %s per device", task.what,
               time.time() - t0,
               f"{flops / 1e9:.3g} GFLOP" if flops else "FLOPs unknown")
  meter = perf.Meter(batch_size=config.batch_size,
                     tokens_per_example=task.tokens_per_example,
                     flops_per_device=flops, num_devices=jax.device_count(),
                     device_kind=perf.device_kind())
  return compiled, meter


def _start_trace(workdir: str) -> bool:
  directory = os.path.join(workdir, "profile",
                           f"process_{jax.process_index()}")
  logging.info("profiling into %s", directory)
  jax.profiler.start_trace(directory)
  return True


def _check_finite(history: list[dict], first_step: int, what: str) -> None:
  for i, m in enumerate(history):
    if not np.isfinite(m["loss"]):
      raise FloatingPointError(
          f"non-finite {what} loss {m['loss']} at step {first_step + i}; the"
          f" last good metrics were logged at step {first_step - 1}")

