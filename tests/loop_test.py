"""The shared training loop: throughput, profiling, signals, workdir lock."""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from conftest import printed, result_of, tiny_config
from cvqcar import exit_codes, loop, perf
from cvqcar import workdir_lock as lock_lib
from cvqcar.tokenizer import trainer as tokenizer_trainer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_flops_per_step_of_a_dense_model_match_the_analytic_count():
  """XLA's count of a sharded two-layer MLP's train step, summed over the
  devices, against 2 FLOPs per multiply-add of every matmul it runs."""
  b, d0, d1, d2 = 256, 128, 512, 256
  mesh = jax.make_mesh((jax.device_count(),), ("data",))

  def step(params, x):
    def loss(params):
      h = jnp.tanh(x @ params["w1"])
      return jnp.mean((h @ params["w2"]) ** 2)
    grads = jax.grad(loss)(params)
    return jax.tree.map(lambda p, g: p - 0.1 * g, params, grads)

  params = {"w1": jnp.ones((d0, d1)), "w2": jnp.ones((d1, d2))}
  x = jnp.ones((b, d0))
  compiled = jax.jit(step, in_shardings=(
      NamedSharding(mesh, P()), NamedSharding(mesh, P("data")))).lower(
          params, x).compile()
  total = perf.compiled_flops(compiled) * jax.device_count()
  # Forward: x@w1, h@w2. Backward: dw2, dh (= dy @ w2.T), dw1; no dx.
  analytic = 2 * b * (d0 * d1 + d1 * d2) + 2 * b * (d1 * d2 + d1 * d2
                                                    + d0 * d1)
  assert abs(total - analytic) / analytic < 0.10, (total, analytic)


def test_peak_table_names_the_devices_jax_reports():
  assert perf.peak_flops("TPU v5 lite") == 197e12  # v5e
  assert perf.peak_flops("TPU v5") == 459e12  # v5p
  assert perf.peak_flops("TPU v6 lite") == 918e12
  assert perf.peak_flops("NVIDIA H100 80GB HBM3") == 989e12
  assert perf.peak_flops("NVIDIA H100 PCIe") == 756e12
  assert perf.peak_flops("NVIDIA A100-SXM4-80GB") == 312e12
  assert perf.peak_flops("cpu") is None


def test_meter_leaves_paused_time_out(monkeypatch):
  clock = [100.0]
  monkeypatch.setattr(perf.time, "perf_counter", lambda: clock[0])
  meter = perf.Meter(batch_size=32, tokens_per_example=10,
                     flops_per_device=2e12, num_devices=4,
                     device_kind="TPU v4")
  for _ in range(4):
    clock[0] += 0.5  # a step
    meter.step()
  with meter.pause():
    clock[0] += 7.0  # an eval
  got = meter.read()
  assert got["perf/step_time_s"] == pytest.approx(0.5)
  assert got["perf/examples_per_s_per_device"] == pytest.approx(16.0)
  assert got["perf/tokens_per_s_per_device"] == pytest.approx(160.0)
  assert got["perf/tflops_per_device"] == pytest.approx(4.0)
  assert got["perf/mfu"] == pytest.approx(4e12 / 275e12)
  assert meter.read() == {}  # a new interval, no steps yet


@pytest.mark.parametrize("spec", ["3:2", "0:4", "x", "5"])
def test_bad_profile_steps_are_refused(spec):
  with pytest.raises(ValueError, match="profile_steps"):
    loop.parse_profile_steps(spec)


@pytest.mark.slow
def test_sigint_stops_with_a_checkpoint_and_the_run_resumes(tmp_path):
  """One process, no jax.distributed: SIGINT mid-run saves at the step
  reached (not a checkpoint_every multiple); perf/* and a profile are
  written; the next call goes on to the end."""
  config = tiny_config()
  config.update(num_train_steps=8, checkpoint_every=1000,
                profile_steps="2:3")

  def on_log(step, total, scalars):
    del total
    if step == 3 and "train/loss" in scalars:
      os.kill(os.getpid(), signal.SIGINT)

  workdir = str(tmp_path / "run")
  handler = signal.getsignal(signal.SIGINT)
  first = tokenizer_trainer.train_and_evaluate(config, workdir, on_log)
  assert signal.getsignal(signal.SIGINT) is handler  # restored
  assert first.preempted and 3 <= first.last_step < 8
  steps = sorted(int(p) for p in os.listdir(f"{workdir}/checkpoints")
                 if p.isdigit())
  assert steps == [first.last_step]
  assert not os.path.exists(f"{workdir}/{lock_lib.LOCK_FILE}")
  rows = [json.loads(x) for x in open(f"{workdir}/metrics.jsonl")]
  train = [r for r in rows if "train/loss" in r]
  assert all(r["perf/step_time_s"] > 0 for r in train)
  assert all(r["perf/tflops_per_device"] > 0 for r in train)
  assert all(r["perf/examples_per_s_per_device"] > 0 for r in train)
  traces = [f for _, _, fs in os.walk(f"{workdir}/profile/process_0")
            for f in fs if f.endswith(".xplane.pb")]
  assert traces, "no profiler trace written"

  second = tokenizer_trainer.train_and_evaluate(config, workdir)
  assert not second.preempted and second.last_step == 8
  assert sorted(second.train) == list(range(first.last_step + 1, 9))


def _free_port():
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def _worker(workdir, log, *flags):
  out = open(log, "w")
  return subprocess.Popen(
      [sys.executable, os.path.join(REPO, "tests", "multiprocess_worker.py"),
       "--kind=tokenizer", f"--workdir={workdir}", *flags],
      stdout=out, stderr=subprocess.STDOUT, text=True)


def _wait_for(log, line, proc, timeout=300):
  deadline = time.time() + timeout
  while time.time() < deadline:
    if printed(open(log).read(), line):
      return
    assert proc.poll() is None, open(log).read()[-3000:]
    time.sleep(0.05)
  raise AssertionError(f"no {line!r}: {open(log).read()[-3000:]}")


@pytest.mark.slow
def test_a_live_workdir_refuses_a_second_trainer_until_its_holder_dies(
    tmp_path):
  workdir = tmp_path / "run"
  first = _worker(workdir, tmp_path / "first.log", "--steps=60",
                  "--checkpoint_every=2", "--step_sleep=0.4")
  _wait_for(tmp_path / "first.log", "STEP 5", first)
  # The train command refuses at once (the lock comes before any weights
  # are read), naming the holder.
  t0 = time.time()
  second = subprocess.run(
      [sys.executable, "-m", "cvqcar.train",
       "--config=configs/cvq_tokenizer.py:tiny", f"--workdir={workdir}"],
      cwd=REPO, capture_output=True, text=True, timeout=120)
  assert time.time() - t0 < 30
  assert second.returncode not in (0, exit_codes.PREEMPTED)
  assert f"pid {first.pid} on host {socket.gethostname()}" in second.stderr
  assert "in use by" in second.stderr

  first.send_signal(signal.SIGKILL)
  first.wait()
  third = _worker(workdir, tmp_path / "third.log", "--steps=60",
                  "--checkpoint_every=2")
  assert third.wait(timeout=300) == 0, open(tmp_path / "third.log").read()
  out = open(tmp_path / "third.log").read()
  assert "taking over the stale lock" in out
  result = result_of(out)
  # Resumed after a checkpoint the killed run committed (every 2 steps;
  # it had logged step 5 well before the kill).
  assert min(result) >= 5 and min(result) % 2 == 1, sorted(result)
  assert max(result) == 60


@pytest.mark.slow
def test_a_second_sigint_exits_at_once(tmp_path):
  log = tmp_path / "run.log"
  proc = _worker(tmp_path / "run", log, "--steps=40", "--step_sleep=2")
  _wait_for(log, "STEP 1", proc)
  proc.send_signal(signal.SIGINT)
  time.sleep(0.2)
  proc.send_signal(signal.SIGINT)
  assert proc.wait(timeout=30) == exit_codes.INTERRUPTED_TWICE


def _hold_like(path, **fields):
  record = {"host": socket.gethostname(), "pid": os.getpid(),
            "started": time.time(), "heartbeat": time.time(),
            "what": "trainer", **fields}
  path.write_text(json.dumps(record))


def test_lock_refuses_a_live_holder_and_takes_over_stale_ones(tmp_path):
  path = tmp_path / lock_lib.LOCK_FILE
  sleeper = subprocess.Popen([sys.executable, "-c",
                              "import time; time.sleep(60)"])
  try:
    _hold_like(path, pid=sleeper.pid)
    with pytest.raises(lock_lib.WorkdirLocked,
                       match=f"pid {sleeper.pid} on host .* is running"):
      lock_lib.WorkdirLock(tmp_path).acquire()
  finally:
    sleeper.kill()
    sleeper.wait()
  # Its pid is gone: stale, taken over.
  with lock_lib.WorkdirLock(tmp_path):
    assert json.loads(path.read_text())["pid"] == os.getpid()
  assert not path.exists()  # released
  # Another host: the heartbeat alone decides.
  _hold_like(path, host="elsewhere", pid=1)
  with pytest.raises(lock_lib.WorkdirLocked, match="heartbeat is 0s old"):
    lock_lib.WorkdirLock(tmp_path, stale_after_s=60).acquire()
  _hold_like(path, host="elsewhere", pid=1, heartbeat=time.time() - 120)
  with lock_lib.WorkdirLock(tmp_path, stale_after_s=60):
    pass
  # An unreadable lock file ages like a silent holder: live while fresh,
  # taken over once stale.
  path.write_text("{half a reco")
  with pytest.raises(lock_lib.WorkdirLocked, match="unreadable lock file"):
    lock_lib.WorkdirLock(tmp_path, stale_after_s=60).acquire()
  os.utime(path, (time.time() - 120, time.time() - 120))
  with lock_lib.WorkdirLock(tmp_path, stale_after_s=60):
    pass


def test_lock_heartbeats_and_nests(tmp_path):
  path = tmp_path / lock_lib.LOCK_FILE
  outer = lock_lib.WorkdirLock(tmp_path, heartbeat_s=0.05)
  with outer:
    first = json.loads(path.read_text())["heartbeat"]
    time.sleep(0.3)
    assert json.loads(path.read_text())["heartbeat"] > first
    with lock_lib.WorkdirLock(tmp_path):  # the train command, then the loop
      pass
    assert path.exists()  # the inner release keeps the outer lock
  assert not path.exists()
  assert np.isfinite(first)
