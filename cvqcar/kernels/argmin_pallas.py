"""Fused Pallas nearest-codeword search: TPU (Mosaic) and GPU (Mosaic GPU)."""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu
from jax.experimental.pallas import tpu as pltpu
from jax.interpreters import mlir
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

BACKENDS = ("tpu", "gpu", "cpu")
# x.e contracting the last axis of both operands: the MXU / tensor cores take
# the transposed operand natively, so no transpose is materialised.
_NT_DIMS = (((1,), (1,)), ((), ()))
# Older JAX spells it TPUCompilerParams and has no TPU interpreter.
if hasattr(pltpu, "CompilerParams"):
  _TPU_COMPILER_PARAMS = pltpu.CompilerParams
else:
  _TPU_COMPILER_PARAMS = pltpu.TPUCompilerParams
_HAS_TPU_INTERPRETER = hasattr(pltpu, "InterpretParams")
# The Mosaic GPU interpreter (CPU simulation of SMEM, TMA, barriers and
# wgmma) ships in JAX 0.10 too, but plgpu exports its params only later.
if hasattr(plgpu, "InterpretGPUParams"):
  _GPU_INTERPRET_PARAMS = plgpu.InterpretGPUParams
else:
  from jax._src.pallas.mosaic_gpu.interpret.params import (
      InterpretGPUParams as _GPU_INTERPRET_PARAMS,
  )
if jax.__version_info__ < (0, 12):
  # JAX 0.10's GPU interpreter hands layout_cast (a register-layout hint, a
  # no-op on values) to XLA:CPU, which has no rule for it; 0.12's treats it
  # as the identity itself. Give XLA:CPU that identity.
  from jax._src.pallas.mosaic_gpu import core as _plgpu_core

  mlir.register_lowering(
      _plgpu_core.layout_cast_p,
      lambda ctx, x, *, new_layout: [x],
      platform="cpu",
  )

# Mosaic GPU kernel: wgmma's M is fixed at 64 rows per warpgroup instruction.
_WGMMA_M = 64
# SMEM for the pipelined tiles, out of the 227 KiB an H100 block may use; the
# rest holds e_sq, the output row, barriers and Mosaic's reduction scratch.
_GPU_SMEM_BYTES = 192 * 1024
_GPU_MAX_STAGES = 4
# fp32 inputs: three bf16 pieces each (hi, mid, lo = 0, 1, 2) and the six
# products above fp32's rounding of hi.hi; mid.lo, lo.mid and lo.lo fall
# below it (XLA's BF16_BF16_F32_X6 does the same). Smallest first, so small
# terms are not rounded away against a large partial sum.
_F32_PIECE_PAIRS = ((2, 0), (0, 2), (1, 1), (1, 0), (0, 1), (0, 0))


def _round_up(value: int, multiple: int) -> int:
  return -(-value // multiple) * multiple


@dataclasses.dataclass(frozen=True)
class TileSizes:
  """Tokens and codes per kernel tile.

  Attributes:
    block_n: tokens per grid step (TPU: the lane axis of the output, so a
      multiple of 128; GPU: the wgmma M, a multiple of 64).
    block_k: codes per step of the code loop (TPU: a multiple of 128 so the
      [block_k, block_n] score tile fills whole MXU passes; GPU: the wgmma N,
      a multiple of 64 up to 256).
  """

  block_n: int
  block_k: int

  def __post_init__(self):
    for name in ("block_n", "block_k"):
      value = getattr(self, name)
      if not isinstance(value, int) or value <= 0 or value % 8:
        raise ValueError(
            f"TileSizes.{name} must be a positive multiple of 8, got {value!r}"
        )

  def check(self, kernel: str) -> None:
    """Raises unless these tiles satisfy `kernel`'s ('tpu'/'gpu') layout."""
    if kernel == "tpu":
      if self.block_n % 128 or self.block_k % 128:
        raise ValueError(
            f"the TPU kernel needs block_n and block_k multiples of 128 (lane"
            f" width), got {self}"
        )
    elif kernel == "gpu":
      if self.block_n % 64 or self.block_k % 64 or self.block_k > 256:
        raise ValueError(
            f"the Mosaic GPU kernel needs block_n and block_k multiples of 64"
            f" (wgmma M; N in whole swizzled tiles) and block_k <= 256 (wgmma"
            f" N), got {self}"
        )
      if self.block_n * self.block_k > 128 * 128:
        raise ValueError(
            f"the Mosaic GPU kernel keeps the [block_n, block_k] fp32"
            f" accumulator in one warpgroup's registers: block_n * block_k"
            f" must be <= {128 * 128}, got {self}"
        )
    else:
      raise ValueError(f"kernel must be 'tpu' or 'gpu', got {kernel!r}")


def default_tiles(backend: str) -> TileSizes:
  """Tiles for 'tpu', 'gpu' or 'cpu' (TPU kernel in interpret mode)."""
  if backend == "tpu":
    # A [512, 512] fp32 score tile plus its iota/where temporaries is a few
    # MiB: inside the 16 MiB default scoped VMEM of the smallest TPU.
    return TileSizes(block_n=512, block_k=512)
  if backend == "gpu":
    # A [128, 128] fp32 accumulator is 128 registers a thread of the one
    # warpgroup, leaving room for the argmin epilogue under the 255 cap; two
    # m64n128 wgmmas a step, and each streamed codebook byte feeds 128 rows.
    return TileSizes(block_n=128, block_k=128)
  if backend == "cpu":
    # Interpret mode runs the grid as a loop; small tiles keep tests quick.
    return TileSizes(block_n=128, block_k=128)
  raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")


def _precision(dtype) -> lax.Precision | None:
  # Default fp32 precision is 1-pass bf16 on TPU and TF32 on GPU, which
  # flips near-tie argmins; bf16 inputs are exact products either way.
  return lax.Precision.HIGHEST if dtype == jnp.float32 else None


def _tpu_kernel(
    x_ref,  # [block_n, d]
    codebook_ref,  # [block_k, d]
    idx_ref,  # [1, block_n] out
    best_dist_ref,  # [1, block_n] fp32 scratch
    best_idx_ref,  # [1, block_n] int32 scratch
    *,
    num_codes: int,
    precision: lax.Precision | None,
):
  """One (token block, code block) step of the running argmin."""
  code_block = pl.program_id(1)
  block_k = codebook_ref.shape[0]

  @pl.when(code_block == 0)
  def _init():
    best_dist_ref[...] = jnp.full(best_dist_ref.shape, jnp.inf, jnp.float32)
    best_idx_ref[...] = jnp.zeros(best_idx_ref.shape, jnp.int32)

  codebook_kd = codebook_ref[...]
  # Codes on sublanes, tokens on lanes: reducing over codes leaves a
  # lane-dense [1, block_n] row, so scratch and output need no relayout.
  dot_kn = lax.dot_general(
      codebook_kd,
      x_ref[...],
      _NT_DIMS,
      precision=precision,
      preferred_element_type=jnp.float32,
  )
  codebook_f32_kd = codebook_kd.astype(jnp.float32)
  # Recomputed per token block: block_k * d VPU work against the
  # block_k * block_n * d matmul, and it avoids a lane-sparse [K, 1] input.
  e_sq_k1 = jnp.sum(codebook_f32_kd * codebook_f32_kd, axis=1, keepdims=True)
  if num_codes % block_k:
    code_ids_k1 = code_block * block_k + lax.broadcasted_iota(
        jnp.int32, (block_k, 1), 0
    )
    e_sq_k1 = jnp.where(code_ids_k1 < num_codes, e_sq_k1, jnp.inf)
  scores_kn = e_sq_k1 - 2.0 * dot_kn  # ||x||^2 is the same for every code
  block_min_1n = jnp.min(scores_kn, axis=0, keepdims=True)
  # min-then-iota rather than jnp.argmin, which Mosaic lowers only on some
  # TPU generations; the min of matching ids is the lowest tied index.
  row_ids_kn = lax.broadcasted_iota(jnp.int32, scores_kn.shape, 0)
  block_arg_1n = jnp.min(
      jnp.where(scores_kn == block_min_1n, row_ids_kn, block_k),
      axis=0,
      keepdims=True,
  )
  # Strictly less: an equal score in a later block keeps the earlier index.
  better_1n = block_min_1n < best_dist_ref[...]
  best_dist_ref[...] = jnp.where(better_1n, block_min_1n, best_dist_ref[...])
  best_idx_ref[...] = jnp.where(
      better_1n, block_arg_1n + code_block * block_k, best_idx_ref[...]
  )

  @pl.when(code_block == pl.num_programs(1) - 1)
  def _write():
    idx_ref[...] = best_idx_ref[...]


def _tpu_argmin(x_nd, codebook_kd, tiles: TileSizes, interpret) -> jax.Array:
  """Pads to whole tiles and runs the Mosaic kernel; returns int32 [N]."""
  (n, dim), num_codes = x_nd.shape, codebook_kd.shape[0]
  block_n = min(tiles.block_n, _round_up(n, 128))
  block_k = min(tiles.block_k, _round_up(num_codes, 128))
  n_pad = _round_up(n, block_n)
  k_pad = _round_up(num_codes, block_k)
  # Zero rows: padded tokens are dropped below and padded codes are masked
  # to +inf inside the kernel.
  x_nd = jnp.pad(x_nd, ((0, n_pad - n), (0, 0)))
  codebook_kd = jnp.pad(codebook_kd, ((0, k_pad - num_codes), (0, 0)))
  kernel = functools.partial(
      _tpu_kernel,
      num_codes=num_codes,
      precision=_precision(x_nd.dtype),
  )
  idx_1n = pl.pallas_call(
      kernel,
      grid=(n_pad // block_n, k_pad // block_k),
      in_specs=[
          pl.BlockSpec((block_n, dim), lambda i, k: (i, 0)),
          pl.BlockSpec((block_k, dim), lambda i, k: (k, 0)),
      ],
      # The output is one [1, N] row: each token block writes a lane-dense
      # (1, block_n) slice with unmasked stores.
      out_specs=pl.BlockSpec((1, block_n), lambda i, k: (0, i)),
      out_shape=jax.ShapeDtypeStruct((1, n_pad), jnp.int32),
      scratch_shapes=[
          pltpu.VMEM((1, block_n), jnp.float32),
          pltpu.VMEM((1, block_n), jnp.int32),
      ],
      # The code axis carries the running min, so it must run in order.
      compiler_params=_TPU_COMPILER_PARAMS(
          dimension_semantics=("parallel", "arbitrary")
      ),
      interpret=interpret,
      name="codebook_argmin_tpu",
  )(x_nd, codebook_kd)
  return idx_1n[0, :n]


@dataclasses.dataclass(frozen=True)
class _GpuPlan:
  """Static layout of one Mosaic GPU launch; sizes are in elements."""

  block_n: int
  block_k: int
  chunk: int  # features per pipeline step: one swizzled SMEM row
  num_chunks: int
  num_code_blocks: int
  pieces: int  # bf16 pieces per input value: 1 (bf16) or 3 (fp32)
  stages: int  # pipeline steps in flight
  resident_x: bool  # the token tile is loaded once and stays in SMEM

  @property
  def swizzle(self) -> int:
    return self.chunk * 2  # bytes: the operands are always bf16

  @property
  def piece_pairs(self) -> tuple[tuple[int, int], ...]:
    return _F32_PIECE_PAIRS if self.pieces == 3 else ((0, 0),)


def _gpu_plan(block_n, block_k, dim, pieces, num_code_blocks) -> _GpuPlan:
  """Picks the feature chunk, x residency and pipeline depth for SMEM."""
  # A 128-byte swizzle (64 bf16) is the widest wgmma reads. Tiny D takes a
  # narrower one rather than padding 3 features to 64, and so do wide fp32
  # tiles (three bf16 pieces a value) when two steps would not fit.
  chunk = min(64, max(16, pl.next_power_of_2(dim)))
  while True:
    num_chunks = -(-dim // chunk)
    num_steps = num_chunks * num_code_blocks
    x_tile = pieces * block_n * num_chunks * chunk * 2
    code_step, x_step = (pieces * chunk * b * 2 for b in (block_k, block_n))
    # A resident x halves the bytes each step streams from L2.
    resident_x = x_tile + 2 * code_step <= _GPU_SMEM_BYTES
    free = _GPU_SMEM_BYTES - x_tile if resident_x else _GPU_SMEM_BYTES
    step_bytes = code_step if resident_x else code_step + x_step
    stages = min(free // step_bytes, _GPU_MAX_STAGES, num_steps)
    # Tiles that pass TileSizes.check fit two steps of 16 features.
    if stages >= min(2, num_steps) or chunk == 16:
      return _GpuPlan(
          block_n,
          block_k,
          chunk,
          num_chunks,
          num_code_blocks,
          pieces,
          stages,
          resident_x,
      )
    chunk //= 2


def _bf16_pieces(values, pieces: int) -> jax.Array:
  """[pieces, *shape] bf16 summing to `values`: 3 pieces carry all of fp32."""
  # Each piece rounds what the earlier ones left (an exact fp32 difference)
  # and keeps 8 of the significand's 24 bits.
  rest = values.astype(jnp.float32)
  out = []
  for _ in range(pieces):
    out.append(rest.astype(jnp.bfloat16))
    rest = rest - out[-1].astype(jnp.float32)
  return jnp.stack(out)


def _gpu_kernel(
    x_gmem,  # [pieces, n_pad, d_pad] bf16
    codebook_gmem,  # [pieces, d_pad, k_pad] bf16: codes on the minor axis
    e_sq_gmem,  # [k_pad] fp32, +inf past the last real code
    idx_gmem,  # [n_pad] int32 out
    x_smem,  # [num_chunks or stages, pieces, block_n, chunk]
    codebook_smem,  # [stages, pieces, chunk, block_k]
    e_sq_smem,  # [2, block_k]: this code block's norms and the next's
    idx_smem,  # [block_n]
    step_barriers,  # one per stage
    e_sq_barriers,  # one per e_sq slot
    x_barrier,  # the resident x tile; None when x streams with the codes
    *,
    plan: _GpuPlan,
):
  """One token block: streams every code block, running argmin in registers.

  Steps run over (code block, feature chunk) in order; step s lives in SMEM
  slot s % stages, so TMA fills later slots while wgmma reads this one.
  """
  block_n, block_k, chunk = plan.block_n, plan.block_k, plan.chunk
  num_steps = plan.num_chunks * plan.num_code_blocks
  rows = pl.ds(lax.axis_index("tokens") * block_n, block_n)

  def fetch(step, slot):
    code_block = lax.div(step, plan.num_chunks)
    cols = pl.ds(lax.rem(step, plan.num_chunks) * chunk, chunk)
    codes = pl.ds(code_block * block_k, block_k)
    for piece in range(plan.pieces):
      if not plan.resident_x:
        plgpu.copy_gmem_to_smem(
            x_gmem.at[piece, rows, cols],
            x_smem.at[slot, piece],
            step_barriers.at[slot],
        )
      plgpu.copy_gmem_to_smem(
          codebook_gmem.at[piece, cols, codes],
          codebook_smem.at[slot, piece],
          step_barriers.at[slot],
      )

  def refill(step):  # once step's wgmma is done, its slot takes a later one
    @pl.when(step + plan.stages < num_steps)
    def _():
      fetch(step + plan.stages, lax.rem(step, plan.stages))

  def fetch_e_sq(code_block):
    slot = lax.rem(code_block, 2)
    plgpu.copy_gmem_to_smem(
        e_sq_gmem.at[pl.ds(code_block * block_k, block_k)],
        e_sq_smem.at[slot],
        e_sq_barriers.at[slot],
    )

  if plan.resident_x:
    for c in range(plan.num_chunks):
      for piece in range(plan.pieces):
        plgpu.copy_gmem_to_smem(
            x_gmem.at[piece, rows, pl.ds(c * chunk, chunk)],
            x_smem.at[c, piece],
            x_barrier.at[0],
        )
  for step in range(plan.stages):
    fetch(jnp.int32(step), step)
  fetch_e_sq(jnp.int32(0))
  if plan.resident_x:
    plgpu.barrier_wait(x_barrier.at[0])

  def code_block_body(code_block, carry):
    best_dist_n, best_idx_n = carry

    @pl.when(code_block + 1 < plan.num_code_blocks)
    def _():
      fetch_e_sq(code_block + 1)

    def matmul(acc_ref):
      for c in range(plan.num_chunks):
        step = code_block * plan.num_chunks + c
        slot = lax.rem(step, plan.stages)
        plgpu.barrier_wait(step_barriers.at[slot])
        for x_piece, code_piece in plan.piece_pairs:
          x_tile = x_smem.at[c if plan.resident_x else slot, x_piece]
          plgpu.wgmma(acc_ref, x_tile, codebook_smem.at[slot, code_piece])
        if c:
          # Once only this step's wgmmas are in flight the previous slot
          # is free: refill it while the tensor cores work.
          plgpu.wgmma_wait(len(plan.piece_pairs))
          refill(step - 1)
      return acc_ref[...]  # waits for every wgmma

    dot_nk = pl.run_scoped(matmul, plgpu.ACC((block_n, block_k), jnp.float32))
    refill(code_block * plan.num_chunks + plan.num_chunks - 1)
    e_sq_slot = lax.rem(code_block, 2)
    plgpu.barrier_wait(e_sq_barriers.at[e_sq_slot])
    # Codes along the accumulator's columns: the WGMMA layout reduced over
    # rows, so the broadcast below needs no data movement.
    e_sq_k = plgpu.layout_cast(
        e_sq_smem[e_sq_slot], plgpu.Layout.WGMMA.reduce(0)
    )
    shape = (block_n, block_k)
    scores_nk = lax.broadcast_in_dim(e_sq_k, shape, [1]) - 2.0 * dot_nk
    block_min_n = jnp.min(scores_nk, axis=1)
    # min-then-iota, as in the TPU kernel: the lowest tied column wins.
    col_ids_nk = plgpu.broadcasted_iota(
        jnp.int32, shape, 1, layout=plgpu.Layout.WGMMA
    )
    is_min_nk = scores_nk == lax.broadcast_in_dim(block_min_n, shape, [0])
    block_arg_n = jnp.min(jnp.where(is_min_nk, col_ids_nk, block_k), axis=1)
    better_n = block_min_n < best_dist_n  # strict: earlier block wins ties
    best_dist_n = jnp.where(better_n, block_min_n, best_dist_n)
    best_idx_n = jnp.where(
        better_n, block_arg_n + code_block * block_k, best_idx_n
    )
    return best_dist_n, best_idx_n

  row_layout = plgpu.Layout.WGMMA.reduce(1)  # one value per accumulator row
  init = (
      plgpu.layout_cast(jnp.full((block_n,), jnp.inf, jnp.float32), row_layout),
      plgpu.layout_cast(jnp.zeros((block_n,), jnp.int32), row_layout),
  )
  _, best_idx_n = lax.fori_loop(0, plan.num_code_blocks, code_block_body, init)
  idx_smem[...] = best_idx_n
  plgpu.commit_smem()
  plgpu.copy_smem_to_gmem(idx_smem, idx_gmem.at[rows])
  plgpu.wait_smem_to_gmem(0)


def _gpu_argmin(x_nd, codebook_kd, tiles: TileSizes, interpret) -> jax.Array:
  """Pads, splits into bf16 pieces, runs the Mosaic GPU kernel; int32 [N]."""
  (n, dim), num_codes = x_nd.shape, codebook_kd.shape[0]
  block_n = min(tiles.block_n, _round_up(n, _WGMMA_M))
  block_k = min(tiles.block_k, _round_up(num_codes, _WGMMA_M))
  n_pad = _round_up(n, block_n)
  k_pad = _round_up(num_codes, block_k)
  pieces = 3 if x_nd.dtype == jnp.float32 else 1
  plan = _gpu_plan(block_n, block_k, dim, pieces, k_pad // block_k)
  d_pad = plan.num_chunks * plan.chunk
  # Zero features change neither x.e nor ||e||^2; padded tokens are dropped
  # below and padded codes get +inf norms, so they lose to every real code.
  x_nd = jnp.pad(x_nd, ((0, n_pad - n), (0, d_pad - dim)))
  codebook_kd = jnp.pad(codebook_kd, ((0, k_pad - num_codes), (0, d_pad - dim)))
  e_sq_k = jnp.sum(jnp.square(codebook_kd.astype(jnp.float32)), axis=-1)
  e_sq_k = jnp.where(jnp.arange(k_pad) < num_codes, e_sq_k, jnp.inf)
  # [D, K], codes contiguous: wgmma reads this N-major B natively for 16-bit
  # types, and JAX 0.10's interpreter cannot read a transposed SMEM view.
  codebook_pdk = _bf16_pieces(codebook_kd.T, pieces)
  x_pnd = _bf16_pieces(x_nd, pieces)
  transforms = (
      plgpu.TilingTransform((8, plan.chunk)),
      plgpu.SwizzleTransform(plan.swizzle),
  )
  x_buffers = plan.num_chunks if plan.resident_x else plan.stages
  arrivals = pieces * (1 if plan.resident_x else 2)  # one per TMA copy
  scratch = [
      plgpu.SMEM(
          (x_buffers, pieces, block_n, plan.chunk),
          jnp.bfloat16,
          transforms=transforms,
      ),
      plgpu.SMEM(
          (plan.stages, pieces, plan.chunk, block_k),
          jnp.bfloat16,
          transforms=transforms,
      ),
      plgpu.SMEM((2, block_k), jnp.float32),
      plgpu.SMEM((block_n,), jnp.int32),
      plgpu.Barrier(num_arrivals=arrivals, num_barriers=plan.stages),
      plgpu.Barrier(num_arrivals=1, num_barriers=2),
      plgpu.Barrier(num_arrivals=plan.num_chunks * pieces, num_barriers=1)
      if plan.resident_x
      else None,
  ]
  idx_n = plgpu.kernel(
      functools.partial(_gpu_kernel, plan=plan),
      out_type=jax.ShapeDtypeStruct((n_pad,), jnp.int32),
      scratch_types=scratch,
      grid=(n_pad // block_n,),
      grid_names=("tokens",),
      interpret=interpret,
      kernel_name="codebook_argmin_gpu",
  )(x_pnd, codebook_pdk, e_sq_k)
  return idx_n[:n]


def _resolve(backend: str | None, interpret: bool | None):
  """(kernel, interpret arg for pallas_call) for the requested backend."""
  platform = jax.default_backend()
  backend = platform if backend is None else backend
  if backend not in BACKENDS:
    raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
  # A CPU host has no kernel of its own: it interprets the TPU kernel.
  kernel = "tpu" if backend == "cpu" else backend
  # interpret=False on another host is allowed: jax.export can still lower
  # the kernel for a TPU/GPU target from there.
  if interpret is None:
    interpret = platform != kernel
  if interpret and kernel == "tpu" and _HAS_TPU_INTERPRETER:
    # The TPU interpreter simulates VMEM and flags out-of-bounds and
    # uninitialised reads, which the generic interpreter does not.
    return kernel, pltpu.InterpretParams()
  if interpret and kernel == "gpu":
    # Only the GPU interpreter runs TMA copies, barriers and wgmma on a CPU.
    return kernel, _GPU_INTERPRET_PARAMS()
  return kernel, bool(interpret)


def _check_inputs(x: jax.Array, codebook: jax.Array) -> None:
  """Raises naming both shapes unless x [N, D] and codebook [K, D] fit."""
  shapes = (
      f"x {x.shape} {x.dtype} and codebook {codebook.shape} {codebook.dtype}"
  )
  if x.ndim != 2 or codebook.ndim != 2:
    raise ValueError(f"expected x [N, D] and codebook [K, D]; got {shapes}")
  if x.shape[1] != codebook.shape[1]:
    raise ValueError(f"{shapes} disagree on D (the last axis)")
  if codebook.shape[0] == 0:
    raise ValueError(f"{shapes}: the codebook has no codes")
  if x.dtype != codebook.dtype:
    raise ValueError(f"{shapes} must share a dtype")
  if x.dtype not in (jnp.float32, jnp.bfloat16):
    raise ValueError(f"{shapes} must be float32 or bfloat16")


@functools.partial(jax.jit, static_argnames=("tiles", "backend", "interpret"))
def argmin_pallas(
    x: jax.Array,
    codebook: jax.Array,
    *,
    tiles: TileSizes | None = None,
    backend: str | None = None,
    interpret: bool | None = None,
) -> jax.Array:
  """Index of the nearest codeword for each row of x, as a fused kernel.

  Args:
    x: [N, D] fp32 or bf16 vectors.
    codebook: [K, D] codewords, same dtype as x.
    tiles: tile sizes; `default_tiles(backend)` when None.
    backend: 'tpu', 'gpu' (compiled, it needs Hopper's wgmma: sm_90) or 'cpu'
      (the TPU kernel, interpreted); the default JAX backend when None.
    interpret: run the kernel in the Pallas interpreter; when None, only if
      the kernel's platform is not the default backend.

  Returns:
    int32 [N]; ties resolve to the lowest index, as in `argmin.reference`.
  """
  _check_inputs(x, codebook)
  kernel, interpret_arg = _resolve(backend, interpret)
  if tiles is None:
    tiles = default_tiles(backend or jax.default_backend())
  tiles.check(kernel)
  # Indices are piecewise constant, so no gradient flows through them; this
  # keeps autodiff from trying to differentiate the kernel body.
  x, codebook = lax.stop_gradient(x), lax.stop_gradient(codebook)
  if x.shape[0] == 0:
    return jnp.zeros((0,), jnp.int32)
  run = _tpu_argmin if kernel == "tpu" else _gpu_argmin
  return run(x, codebook, tiles, interpret_arg)


def sharded_argmin(
    x: jax.Array,
    codebook: jax.Array,
    mesh: jax.sharding.Mesh,
    axes: str | tuple[str, ...] = "data",
    **kwargs,
) -> jax.Array:
  """`argmin_pallas` on tokens sharded over mesh `axes`, codebook replicated.

  `axes` names every mesh axis the rows are split over (e.g. ('data',
  'fsdp'), major to minor, as in the batch's PartitionSpec). Each device
  runs the kernel on its own rows, so no device gathers the tokens and no
  [N, K] data exists; the result is int32 [N] sharded like x.
  """
  axes = (axes,) if isinstance(axes, str) else tuple(axes)
  missing = [a for a in axes if a not in mesh.shape]
  if not axes or missing:
    raise ValueError(
        f"axes {axes} must be non-empty mesh axes; {missing} not in"
        f" {mesh.axis_names}"
    )
  shards = math.prod(mesh.shape[a] for a in axes)
  if x.ndim != 2 or x.shape[0] % shards:
    raise ValueError(
        f"x {x.shape} must be [N, D] with N divisible by the {shards} shards"
        f" of mesh axes {axes} (codebook {codebook.shape})"
    )
  rows = P(axes, None)
  types = dict(zip(mesh.axis_names, mesh.axis_types, strict=True))
  if any(types[a] == jax.sharding.AxisType.Explicit for a in axes):
    # Explicit axes reject an input sharded unlike in_specs (Auto ones
    # reshard silently), so place both operands first.
    x = jax.sharding.reshard(x, NamedSharding(mesh, rows))
    codebook = jax.sharding.reshard(codebook, NamedSharding(mesh, P()))
  fn = functools.partial(argmin_pallas, **kwargs)
  # check_vma off: under it pallas_call wants each output's manual axis type
  # declared (an API still in flux), and every output row depends only on
  # the local shard anyway.
  return jax.shard_map(
      fn,
      mesh=mesh,
      in_specs=(rows, P(None, None)),
      out_specs=P(axes),
      check_vma=False,
  )(x, codebook)
