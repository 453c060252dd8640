"""Frechet distance between Inception feature statistics, in float64.

Statistics are {mu [2048], sigma [2048, 2048]}, saved and loaded as .npz
with exactly those keys: the format of pytorch-fid's `--save-stats` and of
the published reference files (e.g. ImageNet 256 validation statistics).
`FeatureStats` accumulates them batch by batch with a per-row weight (0 for
padding) and merges across processes; `feature_sums` gives a batch's sums on
device, in float32 at `Precision.HIGHEST` (the default is one bf16 pass on
TPU, TF32 on recent NVIDIA GPUs), and the host adds them up in float64.
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np


def _factor(sigma: np.ndarray) -> np.ndarray:
  """R with R R^T = sigma (V sqrt(W) of its eigendecomposition; rounding's
  negative eigenvalues clipped to 0)."""
  w, v = np.linalg.eigh(sigma)
  return v * np.sqrt(np.clip(w, 0, None))


def trace_sqrt_product(sigma1, sigma2) -> float:
  """Tr sqrt(sigma1 sigma2) of two symmetric positive semi-definite
  matrices. With sigma_i = R_i R_i^T, the product's eigenvalues are the
  squared singular values of R_1^T R_2, so the trace is their sum (the
  nuclear norm), accurate to rounding of the largest one. scipy's sqrtm of
  the non-symmetric product (pytorch-fid's and the ADM evaluator's way)
  agrees to ~1e-12 on full-rank covariances but loses ~1e-3 on singular
  ones (fewer images than features): a set against itself then scores
  below 0."""
  cross = _factor(sigma1).T @ _factor(sigma2)
  return float(np.sum(np.linalg.svd(cross, compute_uv=False)))


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
  """||mu1 - mu2||^2 + Tr(s1 + s2 - 2 sqrt(s1 s2)) in float64: the FID of
  pytorch-fid and the original TF implementation, with the trace of the
  square root taken through symmetric eigenvalues (trace_sqrt_product)."""
  mu1, mu2 = np.atleast_1d(np.float64(mu1)), np.atleast_1d(np.float64(mu2))
  sigma1 = np.atleast_2d(np.float64(sigma1))
  sigma2 = np.atleast_2d(np.float64(sigma2))
  if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape:
    raise ValueError(f"statistics of different sizes: mu {mu1.shape} vs"
                     f" {mu2.shape}, sigma {sigma1.shape} vs {sigma2.shape}")
  diff = mu1 - mu2
  return float(diff.dot(diff) + np.trace(sigma1) + np.trace(sigma2) -
               2 * trace_sqrt_product(sigma1, sigma2))


def feature_sums(features_bd, weights_b) -> dict[str, jax.Array]:
  """On-device {sum [D], outer [D, D]} of one batch's weighted features,
  the sums `FeatureStats.add` keeps."""
  f = features_bd.astype(jnp.float32)
  w = weights_b.astype(jnp.float32)
  highest = jax.lax.Precision.HIGHEST
  return {"sum": jnp.einsum("b,bi->i", w, f, precision=highest),
          "outer": jnp.einsum("b,bi,bj->ij", w, f, f, precision=highest)}


class FeatureStats:
  """Running sums for mu and sigma; rows with weight 0 are left out."""

  def __init__(self, dim: int):
    self.count = 0.0
    self.sum = np.zeros(dim, np.float64)
    self.outer = np.zeros((dim, dim), np.float64)

  def add(self, features, weights=None) -> None:
    x = np.asarray(features, np.float64)
    w = (np.ones(len(x)) if weights is None
         else np.asarray(weights, np.float64))
    self.count += float(w.sum())
    self.sum += w @ x
    self.outer += (x * w[:, None]).T @ x

  def add_sums(self, count, sums) -> None:
    """Adds a batch's `feature_sums` over `count` (weighted) rows."""
    self.count += float(count)
    self.sum += np.asarray(sums["sum"], np.float64)
    self.outer += np.asarray(sums["outer"], np.float64)

  def merge(self, other: FeatureStats) -> None:
    self.count += other.count
    self.sum += other.sum
    self.outer += other.outer

  def arrays(self) -> dict[str, np.ndarray]:
    return {"count": np.float64(self.count), "sum": self.sum,
            "outer": self.outer}

  @classmethod
  def from_arrays(cls, arrays) -> FeatureStats:
    out = cls(len(arrays["sum"]))
    out.count = float(arrays["count"])
    out.sum = np.asarray(arrays["sum"], np.float64)
    out.outer = np.asarray(arrays["outer"], np.float64)
    return out

  def mu_sigma(self) -> tuple[np.ndarray, np.ndarray]:
    """Mean and unbiased covariance (numpy's np.cov, as pytorch-fid)."""
    if self.count < 2:
      raise ValueError(f"FID needs at least 2 images, got {self.count:g}")
    mu = self.sum / self.count
    sigma = (self.outer - self.count * np.outer(mu, mu)) / (self.count - 1)
    return mu, sigma


def save_stats(path: str, mu, sigma) -> None:
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path, "wb") as f:
    np.savez(f, mu=np.float64(mu), sigma=np.float64(sigma))


def load_stats(path: str) -> tuple[np.ndarray, np.ndarray]:
  if not os.path.exists(path):
    raise FileNotFoundError(f"reference statistics {path!r} not found")
  with np.load(path) as f:
    missing = {"mu", "sigma"} - set(f.files)
    if missing:
      raise ValueError(f"{path} lacks {sorted(missing)} (has {f.files});"
                       " expected an .npz with mu and sigma")
    return np.float64(f["mu"]), np.float64(f["sigma"])
