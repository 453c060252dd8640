"""Fused nearest-codeword search as a Mosaic GPU kernel (Hopper: TMA, wgmma).

The GPU half of `argmin_pallas`, which validates inputs and picks the
kernel; `gpu_argmin` here pads to whole tiles and launches it.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu
from jax.interpreters import mlir

# The Mosaic GPU interpreter (CPU simulation of SMEM, TMA, barriers and
# wgmma) ships in JAX 0.10 too, but plgpu exports its params only later.
if hasattr(plgpu, "InterpretGPUParams"):
  INTERPRET_PARAMS = plgpu.InterpretGPUParams
else:
  from jax._src.pallas.mosaic_gpu.interpret import params as _interpret

  INTERPRET_PARAMS = _interpret.InterpretGPUParams
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


def gpu_argmin(x_nd, codebook_kd, tiles, interpret) -> jax.Array:
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
