"""Training throughput: step time, examples and tokens/s, TFLOP/s and MFU."""

from __future__ import annotations

import contextlib
import time

import jax

# Dense bf16 peak FLOP/s per chip (TPU) or GPU, from the vendors' spec
# sheets. A v5p or v4 device is one chip (both TensorCores, megacore).
# Matched against jax's device_kind: TPUs by the exact name JAX reports,
# GPUs by a substring of the product name, most specific first.
TPU_PEAK_FLOPS = {
    "TPU v4": 275e12,
    "TPU v5 lite": 197e12,  # v5e
    "TPU v5e": 197e12,
    "TPU v5": 459e12,  # v5p
    "TPU v5p": 459e12,
    "TPU v6 lite": 918e12,  # v6e (Trillium)
    "TPU v6e": 918e12,
}
GPU_PEAK_FLOPS = (
    ("H100 PCIe", 756e12),
    ("H100", 989e12),  # SXM
    ("H200", 989e12),  # SXM; also GH200
    ("A100", 312e12),
)


def peak_flops(device_kind: str) -> float | None:
  """Dense bf16 peak FLOP/s of one device of this kind; None if unknown
  (CPUs and devices not in the table: no MFU is logged for them)."""
  if device_kind in TPU_PEAK_FLOPS:
    return TPU_PEAK_FLOPS[device_kind]
  for name, flops in GPU_PEAK_FLOPS:
    if name in device_kind:
      return flops
  return None


def compiled_flops(compiled) -> float | None:
  """Model FLOPs per step of one device, from XLA's cost analysis of a
  compiled (partitioned) step. The program is the per-device one, so this
  is the global count over the number of devices. Pallas and other custom
  calls count 0; None where the backend reports nothing."""
  try:
    analysis = compiled.cost_analysis()
  except Exception:  # noqa: BLE001 (some backends do not implement it)
    return None
  if isinstance(analysis, list | tuple):  # older jax: one dict per program
    analysis = analysis[0] if analysis else None
  flops = (analysis or {}).get("flops")
  return float(flops) if flops and flops > 0 else None


class Meter:
  """Times the steps between two log points, leaving out what is not a
  train step (eval, checkpoint saves, the profiler): `pause()` around
  those, `read(step)` at each log point after the metrics are fetched
  (which waits for the device)."""

  def __init__(self, *, batch_size: int, tokens_per_example: int | None,
               flops_per_device: float | None, num_devices: int,
               device_kind: str):
    self.batch_size = batch_size
    self.tokens_per_example = tokens_per_example
    self.flops_per_device = flops_per_device
    self.num_devices = num_devices
    self.peak = peak_flops(device_kind)
    self._start = time.perf_counter()
    self._paused = 0.0
    self._steps = 0

  def step(self) -> None:
    self._steps += 1

  @contextlib.contextmanager
  def pause(self):
    t0 = time.perf_counter()
    try:
      yield
    finally:
      self._paused += time.perf_counter() - t0

  def read(self) -> dict[str, float]:
    """perf/* scalars of the steps since the last read; restarts the
    interval."""
    now = time.perf_counter()
    elapsed = now - self._start - self._paused
    steps, self._start, self._paused, self._steps = self._steps, now, 0.0, 0
    if steps == 0 or elapsed <= 0:
      return {}
    step_time = elapsed / steps
    out = {"perf/step_time_s": step_time,
           "perf/examples_per_s_per_device":
               self.batch_size / step_time / self.num_devices}
    if self.tokens_per_example:
      out["perf/tokens_per_s_per_device"] = (
          out["perf/examples_per_s_per_device"] * self.tokens_per_example)
    if self.flops_per_device:
      out["perf/tflops_per_device"] = (
          self.flops_per_device / step_time / 1e12)
      if self.peak:
        out["perf/mfu"] = self.flops_per_device / step_time / self.peak
    return out


def device_kind() -> str:
  return jax.devices()[0].device_kind
