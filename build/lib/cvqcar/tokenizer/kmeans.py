"""Codebook init from k-means (Lloyd's algorithm) of the first batches' rows.

A codebook drawn at random sits wherever its init scale puts it; one from
k-means of encoder rows starts on the data (SoundStream, Zeghidour et al.
2021; vector-quantize-pytorch's `kmeans_init`), so few codes start dead.
The assignment is the codebook search itself (`kernels.argmin`, exact at
any backend precision); the update sums rows per code in float32.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from cvqcar.kernels import argmin

DEFAULT_ITERS = 10  # as vector-quantize-pytorch's kmeans_iters


class KMeans(NamedTuple):
  centroids_kd: jax.Array  # [K, D] float32
  counts_k: jax.Array  # [K] rows assigned at the last iteration
  inertia: jax.Array  # mean squared distance of a row to its centroid


def _normalize(x):
  return x * jax.lax.rsqrt(jnp.sum(x * x, axis=-1, keepdims=True) + 1e-12)


def fit(rows_nd: jax.Array, num_codes: int, *, key: jax.Array,
        iters: int = DEFAULT_ITERS, cosine: bool = False,
        argmin_impl: str = "auto") -> KMeans:
  """K-means of rows [N, D] into `num_codes` centroids, started from
  distinct random rows (with repeats only when N < K). A centroid that
  loses every row keeps its place. `cosine`: spherical k-means (rows and
  centroids on the unit sphere), for cosine codebooks."""
  if rows_nd.ndim != 2 or rows_nd.shape[0] == 0:
    raise ValueError(f"k-means needs rows [N, D], got shape {rows_nd.shape}")
  if iters < 1:
    raise ValueError(f"k-means needs iters >= 1, got {iters}")
  x_nd = rows_nd.astype(jnp.float32)
  if cosine:
    x_nd = _normalize(x_nd)
  n = x_nd.shape[0]
  start = jax.random.choice(key, n, (num_codes,), replace=n < num_codes)
  centroids_kd = x_nd[start]

  def assign(centroids_kd):
    return argmin.codebook_argmin(x_nd, centroids_kd, impl=argmin_impl)

  def lloyd(_, centroids_kd):
    codes_n = assign(centroids_kd)
    sums_kd = jax.ops.segment_sum(x_nd, codes_n, num_segments=num_codes)
    counts_k = jax.ops.segment_sum(jnp.ones((n,), jnp.float32), codes_n,
                                   num_segments=num_codes)
    means_kd = sums_kd / jnp.maximum(counts_k, 1.0)[:, None]
    if cosine:
      means_kd = _normalize(means_kd)
    return jnp.where(counts_k[:, None] > 0, means_kd, centroids_kd)

  centroids_kd = jax.lax.fori_loop(0, iters, lloyd, centroids_kd)
  codes_n = assign(centroids_kd)
  counts_k = jax.ops.segment_sum(jnp.ones((n,), jnp.float32), codes_n,
                                 num_segments=num_codes)
  inertia = jnp.mean(jnp.sum(jnp.square(
      x_nd - centroids_kd[codes_n]), axis=-1))
  return KMeans(centroids_kd, counts_k, inertia)


def fit_residual(rows_nd: jax.Array, num_codes: int, depth: int, *,
                 key: jax.Array, iters: int = DEFAULT_ITERS,
                 argmin_impl: str = "auto") -> KMeans:
  """A shared residual codebook: K / depth centroids (the last level takes
  the remainder) from k-means of each level's residual rows in turn, so
  the codebook holds coarse codes and fine ones."""
  if depth > num_codes:
    raise ValueError(f"k-means of {depth} levels needs num_codes >= depth,"
                     f" got {num_codes}")
  residual_nd = rows_nd.astype(jnp.float32)
  sizes = [num_codes // depth] * (depth - 1)
  sizes.append(num_codes - sum(sizes))
  parts = []
  for level, size in enumerate(sizes):
    part = fit(residual_nd, size, key=jax.random.fold_in(key, level),
               iters=iters, argmin_impl=argmin_impl)
    codes_n = argmin.codebook_argmin(residual_nd, part.centroids_kd,
                                     impl=argmin_impl)
    residual_nd = residual_nd - part.centroids_kd[codes_n]
    parts.append(part)
  return KMeans(jnp.concatenate([p.centroids_kd for p in parts]),
                jnp.concatenate([p.counts_k for p in parts]),
                parts[-1].inertia)
