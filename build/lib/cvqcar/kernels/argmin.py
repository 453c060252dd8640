"""Nearest-codeword search argmin_k ||x_n - e_k||^2 without an N x K matrix."""

from __future__ import annotations

import functools
import math
from typing import Literal

import jax
import jax.numpy as jnp

Impl = Literal["auto", "reference", "xla", "pallas"]
IMPLS = ("auto", "reference", "xla", "pallas")
# The mesh axes a batch is split over (cvqcar.sharding.BATCH_AXES; kernels
# import nothing of the project, so the names are repeated here).
BATCH_AXES = ("data", "fsdp")

# Codes per scan step of the blocked path. 1024 keeps the [N, block] distance
# tile large enough for the matmul to run at full rate on CPU/GPU while the
# tile stays a small fraction of the full [N, K] matrix.
DEFAULT_BLOCK_K = 1024
DEFAULT_BLOCK_N = 512  # rows per tile on CPU (see default_block_n)


def _check_shapes(x: jax.Array, codebook: jax.Array) -> None:
  if x.ndim != 2 or codebook.ndim != 2:
    raise ValueError(
        "codebook_argmin expects x [N, D] and codebook [K, D]; got x"
        f" {x.shape} and codebook {codebook.shape}"
    )
  if x.shape[1] != codebook.shape[1]:
    raise ValueError(
        f"x {x.shape} and codebook {codebook.shape} disagree on D (the last"
        " axis)"
    )
  if codebook.shape[0] == 0:
    raise ValueError(f"codebook {codebook.shape} has no codes")


# The search must not depend on the backend's default matmul precision (one
# bf16 pass on TPU, TF32 on recent NVIDIA GPUs): emulated at K = 16,384,
# D = 256 those pick another code for 0.83% and 0.12% of rows. Float32
# operands are multiplied in full; bf16 ones are exact in float32 anyway.
_HIGHEST = jax.lax.Precision.HIGHEST


def _scores(x_nd: jax.Array, codebook_kd: jax.Array) -> jax.Array:
  """||e||^2 - 2 x.e in fp32: the distance up to the per-row ||x||^2."""
  dot_nk = jnp.dot(
      x_nd, codebook_kd.T, preferred_element_type=jnp.float32,
      precision=_HIGHEST,
  )  # [n, k]
  e_sq_k = jnp.sum(jnp.square(codebook_kd.astype(jnp.float32)), axis=-1)
  return e_sq_k[None, :] - 2.0 * dot_nk


def reference(x: jax.Array, codebook: jax.Array) -> jax.Array:
  """Plain argmin over the full [N, K] distance matrix. Ties -> lowest index."""
  _check_shapes(x, codebook)
  return jnp.argmin(_scores(x, codebook), axis=-1).astype(jnp.int32)


def _min_and_argmin(scores_nk: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Row min, then the lowest column index holding it.

  Two plain reductions: XLA fuses each with the matmul producing the scores,
  where a variadic (value, index) argmin reduction runs about 2x slower on
  CPU (bench/argmin.py).
  """
  min_n = jnp.min(scores_nk, axis=-1)
  iota_nk = jax.lax.broadcasted_iota(jnp.int32, scores_nk.shape, 1)
  hit_nk = jnp.where(scores_nk == min_n[:, None], iota_nk, scores_nk.shape[1])
  return min_n, jnp.min(hit_nk, axis=-1)


def default_block_n(device: jax.Device | None = None) -> int | None:
  """Rows per tile of the blocked path: on a CPU a [512, block_k] score
  tile stays in cache between the matmul and the two reductions that read
  it (bench/argmin.py); accelerators take all rows at once."""
  device = jax.devices()[0] if device is None else device
  return DEFAULT_BLOCK_N if device.platform == "cpu" else None


@functools.partial(jax.jit, static_argnames=("block_k", "block_n"))
def blocked(
    x: jax.Array, codebook: jax.Array, *, block_k: int = DEFAULT_BLOCK_K,
    block_n: int | None = None,
) -> jax.Array:
  """Scans over blocks of codes keeping a running (min, argmin) per row;
  with `block_n`, over tiles of that many rows one after another.

  Peak extra memory is O(N * block_k) instead of O(N * K) (O(block_n *
  block_k) with row tiles). Codes padded to fill the last block get +inf
  distance so they can never win, and a block only replaces the running
  argmin when strictly better, so ties resolve to the lowest index as in
  `reference`.
  """
  _check_shapes(x, codebook)
  if block_k <= 0:
    raise ValueError(f"block_k must be positive, got {block_k}")
  if block_n is not None and block_n <= 0:
    raise ValueError(f"block_n must be positive or None, got {block_n}")
  n = x.shape[0]
  if block_n is None or n <= block_n:
    return _blocked_codes(x, codebook, block_k)
  pad = -n % block_n
  x_mbd = jnp.pad(x, ((0, pad), (0, 0))).reshape(-1, block_n, x.shape[1])
  return jax.lax.map(lambda x_bd: _blocked_codes(x_bd, codebook, block_k),
                     x_mbd).reshape(-1)[:n]


def _blocked_codes(x: jax.Array, codebook: jax.Array, block_k: int
                   ) -> jax.Array:
  """`blocked` over all rows at once."""
  num_codes, dim = codebook.shape
  block_k = min(block_k, num_codes)
  num_blocks = -(-num_codes // block_k)
  pad = num_blocks * block_k - num_codes
  codebook_bbd = jnp.pad(codebook, ((0, pad), (0, 0))).reshape(
      num_blocks, block_k, dim
  )

  # Folding -2 into x once saves an elementwise pass over every score tile.
  x_neg2 = (-2.0 * x.astype(jnp.float32)).astype(x.dtype)
  e_sq_bk = jnp.sum(jnp.square(codebook_bbd.astype(jnp.float32)), axis=-1)
  if pad:  # Padded codes can never win.
    e_sq_bk = e_sq_bk.at[-1, block_k - pad:].set(jnp.inf)

  def step(carry, inputs):
    best_dist_n, best_idx_n = carry
    block_index, block_kd, e_sq_k = inputs
    scores_nk = e_sq_k[None, :] + jnp.dot(
        x_neg2, block_kd.T, preferred_element_type=jnp.float32,
        precision=_HIGHEST)
    block_min_n, block_arg_n = _min_and_argmin(scores_nk)
    better_n = block_min_n < best_dist_n
    best_dist_n = jnp.where(better_n, block_min_n, best_dist_n)
    best_idx_n = jnp.where(better_n, block_arg_n + block_index * block_k,
                           best_idx_n)
    return (best_dist_n, best_idx_n), None

  n = x.shape[0]
  init = (jnp.full((n,), jnp.inf, jnp.float32), jnp.zeros((n,), jnp.int32))
  (_, best_idx_n), _ = jax.lax.scan(
      step, init,
      (jnp.arange(num_blocks, dtype=jnp.int32), codebook_bbd, e_sq_bk))
  return best_idx_n


def default_impl(device: jax.Device | None = None) -> str:
  """The fastest correct path for `device` (the first default device)."""
  device = jax.devices()[0] if device is None else device
  if device.platform == "tpu":
    return "pallas"
  if device.platform == "gpu":
    # The GPU kernel is built on Hopper's wgmma and TMA (sm_90); other GPUs
    # take the blocked scan, which XLA fuses with its own matmul.
    capability = getattr(device, "compute_capability", "")
    return "pallas" if str(capability).startswith("9.") else "xla"
  # On CPU the kernels only run interpreted (for checking), and the blocked
  # scan fuses well with XLA's CPU matmul.
  return "xla"


def _pallas(x: jax.Array, codebook: jax.Array,
            batch_axes: tuple[str, ...]) -> jax.Array:
  """The fused kernel; per shard when the tokens are split over a mesh.

  A Pallas call is opaque to XLA's partitioner, which would gather sharded
  tokens onto every device; under a mesh context (`jax.set_mesh`) the kernel
  instead runs on each device's rows via shard_map, over every batch axis
  of size > 1 (data and fsdp alike).
  """
  from cvqcar.kernels import argmin_pallas  # Imports Pallas only when used.

  mesh = jax.sharding.get_abstract_mesh()
  if not mesh.empty:
    axes = tuple(a for a in batch_axes if mesh.shape.get(a, 1) > 1)
    shards = math.prod(mesh.shape[a] for a in axes)
    if axes and x.shape[0] % shards == 0:
      return argmin_pallas.sharded_argmin(x, codebook, mesh, axes)
  return argmin_pallas.argmin_pallas(x, codebook)


def codebook_argmin(
    x: jax.Array,
    codebook: jax.Array,
    *,
    impl: Impl = "auto",
    block_k: int = DEFAULT_BLOCK_K,
    batch_axes: tuple[str, ...] = BATCH_AXES,
) -> jax.Array:
  """Index of the nearest codeword (squared L2) for each row of x.

  Args:
    x: [N, D] vectors to quantize (fp32 or bf16).
    codebook: [K, D] codewords.
    impl: 'reference' (full distance matrix), 'xla' (blocked scan), 'pallas'
      (fused kernel) or 'auto' (best for the backend).
    block_k: codes per block for the blocked path.
    batch_axes: mesh axes the rows may be sharded over, major to minor (for
      the Pallas path, which runs per shard over those of size > 1).

  Returns:
    int32 [N] indices; ties resolve to the lowest index.
  """
  if impl not in IMPLS:
    raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
  if impl == "auto":
    impl = default_impl()
  if impl == "reference":
    return reference(x, codebook)
  if impl == "xla":
    return blocked(x, codebook, block_k=block_k, block_n=default_block_n())
  return _pallas(x, codebook, batch_axes)
