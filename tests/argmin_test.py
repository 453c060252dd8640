"""codebook_argmin: every path against a numpy reference."""

import functools
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cvqcar.kernels import argmin


def numpy_argmin(x, codebook):
  x = np.asarray(x, np.float64)
  codebook = np.asarray(codebook, np.float64)
  d = ((x[:, None, :] - codebook[None, :, :]) ** 2).sum(-1)
  return d.argmin(-1), d


def assert_nearest(x, codebook, got, rtol=1e-5):
  """The chosen code is (within tolerance) as near as the true nearest."""
  want, d = numpy_argmin(x, codebook)
  rows = np.arange(len(want))
  np.testing.assert_allclose(d[rows, got], d[rows, want], rtol=rtol,
                             atol=rtol * np.abs(d).max())


@pytest.mark.parametrize("impl", ["reference", "xla"])
@pytest.mark.parametrize("n,d,k,block", [(37, 16, 100, 32), (64, 8, 7, 4),
                                         (5, 3, 1, 1024), (128, 64, 300, 128)])
def test_matches_numpy(impl, n, d, k, block):
  kx, kc = jax.random.split(jax.random.key(n * k))
  x = jax.random.normal(kx, (n, d))
  codebook = jax.random.normal(kc, (k, d))
  got = argmin.codebook_argmin(x, codebook, impl=impl, block_k=block)
  assert got.dtype == jnp.int32 and got.shape == (n,)
  assert int(got.min()) >= 0 and int(got.max()) < k
  assert_nearest(x, codebook, np.asarray(got))


@pytest.mark.parametrize("impl", ["reference", "xla"])
def test_ties_pick_lowest_index(impl):
  # Every codeword appears 3 times, at i, i + 10 and i + 20, and the block
  # size (7) splits the copies across blocks: the first copy must win.
  base = jax.random.normal(jax.random.key(0), (10, 12))
  codebook = jnp.concatenate([base, base, base])
  x = base[jnp.array([3, 9, 0, 5])] + 0.01
  got = argmin.codebook_argmin(x, codebook, impl=impl, block_k=7)
  np.testing.assert_array_equal(got, [3, 9, 0, 5])
  # Exact equidistance: x halfway between codes 4 and 1 -> 1.
  cb = jnp.zeros((6, 2)).at[1].set(jnp.array([1.0, 0.0])).at[4].set(
      jnp.array([-1.0, 0.0])) + jnp.array([0.0, 5.0])
  cb = cb.at[jnp.array([0, 2, 3, 5])].set(100.0)
  x = jnp.array([[0.0, 5.0]])
  assert int(argmin.codebook_argmin(x, cb, impl=impl, block_k=2)[0]) == 1


def test_blocked_equals_reference_bf16():
  kx, kc = jax.random.split(jax.random.key(1))
  x = jax.random.normal(kx, (200, 32)).astype(jnp.bfloat16)
  codebook = jax.random.normal(kc, (333, 32)).astype(jnp.bfloat16)
  ref = argmin.reference(x, codebook)
  got = argmin.blocked(x, codebook, block_k=64)
  np.testing.assert_array_equal(got, ref)  # same fp32 scores, same order


@pytest.mark.parametrize("block_n", [1, 16, 37, 200, 500])
def test_row_tiles_equal_reference(block_n):
  """Row tiles (the CPU default), N not a multiple of the tile, ties in
  every tile: the same codes as the full matrix."""
  kx, kc = jax.random.split(jax.random.key(4))
  base = jax.random.normal(kc, (40, 16))
  codebook = jnp.concatenate([base, base])  # code i ties with i + 40
  x = jnp.concatenate([jax.random.normal(kx, (150, 16)), base[:50 % 40]])
  got = argmin.blocked(x, codebook, block_k=24, block_n=block_n)
  np.testing.assert_array_equal(got, argmin.reference(x, codebook))
  assert int(jnp.max(got)) < 40  # ties: the first copy
  with pytest.raises(ValueError, match="block_n must be positive"):
    argmin.blocked(x, codebook, block_n=0)


def test_row_tiles_only_on_cpu():
  cpu, gpu = (types.SimpleNamespace(platform=p) for p in ("cpu", "gpu"))
  assert argmin.default_block_n(cpu) == argmin.DEFAULT_BLOCK_N
  assert argmin.default_block_n(gpu) is None


def test_jit_and_vmap_compose():
  x = jax.random.normal(jax.random.key(2), (3, 10, 4))
  codebook = jax.random.normal(jax.random.key(3), (50, 4))
  f = jax.jit(jax.vmap(lambda xi: argmin.blocked(xi, codebook, block_k=16)))
  for i in range(3):
    assert_nearest(x[i], codebook, np.asarray(f(x)[i]))


@pytest.mark.parametrize("x_shape,cb_shape", [((4, 3), (5, 4)), ((4,), (5, 4)),
                                              ((4, 3), (0, 3))])
def test_bad_shapes_name_both(x_shape, cb_shape):
  with pytest.raises(ValueError, match=r"codebook"):
    argmin.codebook_argmin(jnp.zeros(x_shape), jnp.zeros(cb_shape))


def test_unknown_impl():
  with pytest.raises(ValueError, match="impl must be one of"):
    argmin.codebook_argmin(jnp.zeros((2, 2)), jnp.zeros((2, 2)), impl="fast")


@pytest.mark.parametrize("platform,capability,expect", [
    ("tpu", None, "pallas"),
    ("gpu", "9.0", "pallas"),  # Hopper: the wgmma/TMA kernel
    ("gpu", "8.0", "xla"),  # A100: no wgmma, the blocked scan
    ("gpu", "10.0", "xla"),
    ("cpu", None, "xla"),
])
def test_auto_picks_the_kernel_only_where_it_compiles(platform, capability,
                                                      expect):
  device = types.SimpleNamespace(platform=platform)
  if capability is not None:
    device.compute_capability = capability
  assert argmin.default_impl(device) == expect


def _bf16(a):
  return np.asarray(jnp.asarray(a, jnp.bfloat16).astype(jnp.float32))


@pytest.mark.parametrize("impl", ["reference", "xla"])
def test_xla_paths_search_at_highest_precision(impl):
  """On a TPU a default-precision float32 matmul rounds its operands to
  bf16 (TF32 on recent NVIDIA GPUs); the XLA paths ask for HIGHEST, so they
  pick the exact nearest code where such rounding would pick another."""
  rng = np.random.default_rng(0)
  x = rng.normal(size=(256, 64)).astype(np.float32)
  # Two near-equidistant codes per row: x plus one of two small offsets
  # whose distances differ by ~1e-3 relative, below bf16's resolution of
  # the dot products.
  offsets = rng.normal(size=(2, 64)).astype(np.float32) * 0.05
  offsets[1] *= 1.0005
  codebook = np.concatenate([x + offsets[0], x + offsets[1]])
  want, _ = numpy_argmin(x, codebook)
  # The inputs are rounding-sensitive: with bf16 operands in the dot the
  # search picks other codes for some rows (||e||^2 stays float32).
  e_sq = (codebook.astype(np.float64) ** 2).sum(-1)
  rounded = (e_sq[None] - 2 * _bf16(x).astype(np.float64)
             @ _bf16(codebook).astype(np.float64).T).argmin(-1)
  assert np.mean(rounded != want) > 0.05
  got = argmin.codebook_argmin(x, codebook, impl=impl, block_k=128)
  np.testing.assert_array_equal(np.asarray(got), want)
  fn = functools.partial(argmin.codebook_argmin, impl=impl, block_k=128)
  text = jax.jit(fn).lower(x, codebook).as_text()
  dots = [line for line in text.splitlines() if "dot_general" in line]
  assert dots and all(line.count("HIGHEST") == 2 for line in dots), dots
