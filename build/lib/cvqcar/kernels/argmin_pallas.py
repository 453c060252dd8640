"""Fused Pallas nearest-codeword search: TPU (Mosaic) and GPU (Mosaic GPU).

The TPU kernel lives here with the public wrapper; the GPU kernel in
argmin_mosaic_gpu.py.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from cvqcar.kernels import argmin_mosaic_gpu

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
    return kernel, argmin_mosaic_gpu.INTERPRET_PARAMS()
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
  run = _tpu_argmin if kernel == "tpu" else argmin_mosaic_gpu.gpu_argmin
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
