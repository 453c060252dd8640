"""Fused Pallas nearest-codeword search: TPU (Mosaic) and GPU (Triton)."""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
from jax.experimental.pallas import triton as plgpu
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


def _round_up(value: int, multiple: int) -> int:
  return -(-value // multiple) * multiple


def _is_power_of_2(value: int) -> bool:
  return value > 0 and value & (value - 1) == 0


@dataclasses.dataclass(frozen=True)
class TileSizes:
  """Tokens and codes per kernel tile.

  Attributes:
    block_n: tokens per grid step (TPU: the lane axis of the output, so a
      multiple of 128; GPU: a power of two >= 16 for Triton's dot).
    block_k: codes per step of the code loop (TPU: a multiple of 128 so the
      [block_k, block_n] score tile fills whole MXU passes; GPU: a power of
      two >= 16).
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
      if not all(
          _is_power_of_2(b) and b >= 16 for b in (self.block_n, self.block_k)
      ):
        raise ValueError(
            f"the Triton kernel needs block_n and block_k powers of two >= 16,"
            f" got {self}"
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
    # A [64, 64] fp32 score tile is 32 registers a thread at 4 warps.
    return TileSizes(block_n=64, block_k=64)
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


def _gpu_kernel(
    x_ref,  # [block_n, d_pad]
    codebook_ref,  # [k_pad, d_pad], whole codebook
    e_sq_ref,  # [k_pad] fp32, +inf past the last real code
    idx_ref,  # [block_n] out
    *,
    block_k: int,
    precision: lax.Precision | None,
):
  """One token block: loops over all code blocks in registers."""
  x_nd = x_ref[...]
  block_n = x_nd.shape[0]
  num_code_blocks = codebook_ref.shape[0] // block_k
  col_ids_k = jnp.arange(block_k, dtype=jnp.int32)

  def body(code_block, carry):
    best_dist_n, best_idx_n = carry
    codes = pl.ds(code_block * block_k, block_k)
    dot_nk = lax.dot_general(
        x_nd,
        codebook_ref[codes, :],
        _NT_DIMS,
        precision=precision,
        preferred_element_type=jnp.float32,
    )
    scores_nk = e_sq_ref[codes][None, :] - 2.0 * dot_nk
    block_min_n = jnp.min(scores_nk, axis=1)
    block_arg_n = jnp.min(
        jnp.where(
            scores_nk == block_min_n[:, None], col_ids_k[None, :], block_k
        ),
        axis=1,
    )
    better_n = block_min_n < best_dist_n  # strict: earlier block wins ties
    best_dist_n = jnp.where(better_n, block_min_n, best_dist_n)
    best_idx_n = jnp.where(
        better_n, block_arg_n + code_block * block_k, best_idx_n
    )
    return best_dist_n, best_idx_n

  init = (
      jnp.full((block_n,), jnp.inf, jnp.float32),
      jnp.zeros((block_n,), jnp.int32),
  )
  _, best_idx_n = lax.fori_loop(0, num_code_blocks, body, init)
  idx_ref[...] = best_idx_n


def _gpu_argmin(x_nd, codebook_kd, tiles: TileSizes, interpret) -> jax.Array:
  """Pads to power-of-two tiles and runs the Triton kernel; int32 [N]."""
  (n, dim), num_codes = x_nd.shape, codebook_kd.shape[0]
  block_n = min(tiles.block_n, max(16, pl.next_power_of_2(n)))
  block_k = min(tiles.block_k, max(16, pl.next_power_of_2(num_codes)))
  # Triton tensors must have power-of-two sizes; zero features change
  # neither x.e nor ||e||^2.
  d_pad = max(16, pl.next_power_of_2(dim))
  n_pad = _round_up(n, block_n)
  k_pad = _round_up(num_codes, block_k)
  x_nd = jnp.pad(x_nd, ((0, n_pad - n), (0, d_pad - dim)))
  codebook_kd = jnp.pad(
      codebook_kd, ((0, k_pad - num_codes), (0, d_pad - dim))
  )
  # ||e||^2 once in XLA rather than per token block; +inf norms make the
  # padded codes lose to every real one.
  e_sq_k = jnp.sum(jnp.square(codebook_kd.astype(jnp.float32)), axis=-1)
  e_sq_k = jnp.where(jnp.arange(k_pad) < num_codes, e_sq_k, jnp.inf)
  kernel = functools.partial(
      _gpu_kernel, block_k=block_k, precision=_precision(x_nd.dtype)
  )
  idx_n = pl.pallas_call(
      kernel,
      grid=(n_pad // block_n,),
      in_specs=[
          pl.BlockSpec((block_n, d_pad), lambda i: (i, 0)),
          pl.BlockSpec((k_pad, d_pad), lambda i: (0, 0)),
          pl.BlockSpec((k_pad,), lambda i: (0,)),
      ],
      out_specs=pl.BlockSpec((block_n,), lambda i: (i,)),
      out_shape=jax.ShapeDtypeStruct((n_pad,), jnp.int32),
      compiler_params=plgpu.CompilerParams(num_warps=4, num_stages=2),
      interpret=interpret,
      name="codebook_argmin_gpu",
  )(x_nd, codebook_kd, e_sq_k)
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
    backend: 'tpu', 'gpu' or 'cpu' (the TPU kernel, interpreted); the default
      JAX backend when None.
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
    axis: str = "data",
    **kwargs,
) -> jax.Array:
  """`argmin_pallas` on tokens sharded over `axis`, codebook replicated.

  Each device runs the kernel on its own rows, so no [N, K] data and no
  cross-device traffic is needed; the result is int32 [N] sharded like x.
  """
  if axis not in mesh.shape:
    raise ValueError(f"axis {axis!r} is not in the mesh axes {mesh.axis_names}")
  if x.ndim != 2 or x.shape[0] % mesh.shape[axis]:
    raise ValueError(
        f"x {x.shape} must be [N, D] with N divisible by mesh axis {axis!r}"
        f" of size {mesh.shape[axis]} (codebook {codebook.shape})"
    )
  axis_type = dict(zip(mesh.axis_names, mesh.axis_types, strict=True))[axis]
  if axis_type == jax.sharding.AxisType.Explicit:
    # Explicit axes reject an input sharded unlike in_specs (Auto ones
    # reshard silently), so place both operands first.
    x = jax.sharding.reshard(x, NamedSharding(mesh, P(axis, None)))
    codebook = jax.sharding.reshard(codebook, NamedSharding(mesh, P()))
  fn = functools.partial(argmin_pallas, **kwargs)
  # check_vma off: under it pallas_call wants each output's manual axis type
  # declared (an API still in flux), and every output row depends only on
  # the local shard anyway.
  return jax.shard_map(
      fn,
      mesh=mesh,
      in_specs=(P(axis, None), P(None, None)),
      out_specs=P(axis),
      check_vma=False,
  )(x, codebook)
