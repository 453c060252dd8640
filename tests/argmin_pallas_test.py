"""argmin_pallas: both kernels, interpreted on CPU and compiled on hardware."""

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import export
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from cvqcar.kernels import argmin, argmin_mosaic_gpu
from cvqcar.kernels import argmin_pallas as ap

TOLERANCE = {jnp.float32: 1e-5, jnp.bfloat16: 1e-3}


def exact_distances(x, codebook):
  """[n, k] squared distances in float64 from the values as stored."""
  x = np.asarray(x.astype(jnp.float32), np.float64)
  codebook = np.asarray(codebook.astype(jnp.float32), np.float64)
  return ((x[:, None, :] - codebook[None, :, :]) ** 2).sum(-1)


def assert_as_near(x, codebook, got, rtol):
  """Each chosen code is within tolerance as near as the reference's pick.

  One-sided: a kernel that resolves a near tie better than the reference
  (whose fp32 matmul is 1-pass bf16 on TPU) still passes.
  """
  got = np.asarray(got)
  ref = np.asarray(argmin.reference(x, codebook))
  assert got.shape == ref.shape and got.dtype == np.int32
  assert got.min() >= 0 and got.max() < codebook.shape[0]
  d = exact_distances(x, codebook)
  rows = np.arange(len(got))
  atol = rtol * np.abs(d).max()
  np.testing.assert_array_less(d[rows, got], d[rows, ref] + atol)
  np.testing.assert_array_less(d[rows, got], d.min(-1) + atol)


def random_inputs(n, k, d, dtype, seed=0):
  kx, kc = jax.random.split(jax.random.key(seed))
  x = jax.random.normal(kx, (n, d)).astype(dtype)
  codebook = jax.random.normal(kc, (k, d)).astype(dtype)
  return x, codebook


class _KernelTests:
  """Properties every kernel must have; subclasses pick kernel and mode."""

  BACKEND: str
  INTERPRET: bool
  # Two tilings: several code blocks per token block, and fewer, larger ones.
  TILES: tuple[ap.TileSizes, ap.TileSizes]

  @pytest.fixture(autouse=True)
  def _needs_backend(self):
    if not self.INTERPRET and jax.default_backend() != self.BACKEND:
      pytest.skip(f"needs a {self.BACKEND}")

  def run(self, x, codebook, tiles):
    return ap.argmin_pallas(
        x, codebook, tiles=tiles, backend=self.BACKEND,
        interpret=self.INTERPRET,
    )

  # Interpret mode compiles each case for about a second, so each shape
  # meets one dtype per tiling rather than every combination.
  @pytest.mark.parametrize(
      "n,k,d,dtype,tile_id",
      [(37, 100, 16, jnp.float32, 0),  # K < block_k, N < block_n
       (37, 100, 16, jnp.bfloat16, 1),
       (300, 700, 64, jnp.float32, 1),  # neither a multiple of any tile
       (300, 700, 64, jnp.bfloat16, 0),
       (5, 7, 3, jnp.float32, 0),  # D below every hardware minimum
       (5, 7, 3, jnp.bfloat16, 1),
       (256, 512, 32, jnp.float32, 1),  # whole tiles: no padding at all
       (256, 512, 32, jnp.bfloat16, 0)],
  )
  def test_as_near_as_reference(self, n, k, d, dtype, tile_id):
    x, codebook = random_inputs(n, k, d, dtype, seed=n + k)
    got = self.run(x, codebook, self.TILES[tile_id])
    assert_as_near(x, codebook, got, TOLERANCE[dtype])

  @pytest.mark.parametrize("tile_id", [0, 1])
  def test_exact_ties_pick_lowest_index(self, tile_id):
    # Each of 130 codes appears at i, i + 130 and i + 260: copies fall in
    # the same code block or in later ones depending on the tiling.
    base = jax.random.normal(jax.random.key(0), (130, 12))
    codebook = jnp.concatenate([base, base, base])
    picks = jnp.array([3, 129, 0, 77, 126])
    x = base[picks] + 0.01
    got = self.run(x, codebook, self.TILES[tile_id])
    np.testing.assert_array_equal(got, picks)
    # Exact equidistance: x halfway between codes 4 and 1 -> 1.
    cb = jnp.zeros((6, 2)).at[1].set(jnp.array([1.0, 0.0])).at[4].set(
        jnp.array([-1.0, 0.0])) + jnp.array([0.0, 5.0])
    cb = cb.at[jnp.array([0, 2, 3, 5])].set(100.0)
    got = self.run(jnp.array([[0.0, 5.0]]), cb, self.TILES[tile_id])
    assert int(got[0]) == 1

  @pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
  def test_near_ties(self, dtype):
    # Codes 0..99 and a copy shifted by 1e-3 at 100..199 (another block
    # for the first tiling): either is acceptable only within tolerance.
    base = jax.random.normal(jax.random.key(1), (100, 32))
    shift = 1e-3 * jax.random.normal(jax.random.key(2), (100, 32))
    codebook = jnp.concatenate([base, base + shift]).astype(dtype)
    noise = 0.05 * jax.random.normal(jax.random.key(3), (60, 32))
    x = (base[jnp.arange(60) % 100] + noise).astype(dtype)
    got = self.run(x, codebook, self.TILES[0])
    assert_as_near(x, codebook, got, TOLERANCE[dtype])

  def test_padded_codes_never_win(self):
    # Codes sit far from the origin and x near it, so a zero-filled pad
    # code would be the nearest if the kernel did not exclude it.
    x, codebook = random_inputs(20, 130, 8, jnp.float32, seed=4)
    codebook = codebook + 10.0
    got = self.run(0.01 * x, codebook, self.TILES[0])
    np.testing.assert_array_equal(
        got, argmin.reference(0.01 * x, codebook)
    )

  def test_gradients_match_reference_indices(self):
    x, codebook = random_inputs(40, 50, 8, jnp.float32, seed=5)

    def vq_loss(x, codebook, nearest):
      quantized = jnp.take(codebook, nearest(x, codebook), axis=0)
      sg = jax.lax.stop_gradient
      commit = jnp.mean((x - sg(quantized)) ** 2)
      codebook_term = jnp.mean((sg(x) - quantized) ** 2)
      straight_through = x + sg(quantized - x)
      return commit + codebook_term + jnp.sum(straight_through**2)

    kernel = functools.partial(self.run, tiles=self.TILES[0])
    grads = jax.grad(vq_loss, argnums=(0, 1))(x, codebook, kernel)
    want = jax.grad(vq_loss, argnums=(0, 1))(x, codebook, argmin.reference)
    for g, w in zip(grads, want, strict=True):
      np.testing.assert_allclose(g, w, rtol=1e-6)

  @pytest.mark.parametrize("mesh_shape,axes", [
      ((8,), ("data",)),
      ((1, 8), ("data", "fsdp")),  # pure FSDP: the tokens split over fsdp
      ((2, 4), ("data", "fsdp")),
  ])
  def test_sharded_tokens_replicated_codebook(self, mesh_shape, axes):
    if jax.device_count() < 8:
      pytest.skip("needs 8 devices")
    mesh = jax.make_mesh(mesh_shape, ("data", "fsdp")[:len(mesh_shape)])
    x, codebook = random_inputs(8 * 24, 50, 16, jnp.float32)
    x = jax.device_put(x, NamedSharding(mesh, P(axes)))
    fn = jax.jit(lambda x, cb: ap.sharded_argmin(
        x, cb, mesh, axes, tiles=self.TILES[0], backend=self.BACKEND,
        interpret=self.INTERPRET,
    ))
    got = fn(x, codebook)
    assert got.sharding.spec == P(axes)
    np.testing.assert_array_equal(got, argmin.reference(x, codebook))


class TestTpuKernelInterpret(_KernelTests):
  BACKEND = "tpu"
  INTERPRET = True
  TILES = (ap.TileSizes(128, 128), ap.TileSizes(256, 256))


class TestGpuKernelInterpret(_KernelTests):
  """The Mosaic GPU kernel under JAX's GPU interpreter: the same kernel body,
  with SMEM, TMA copies, barriers and wgmma simulated on the CPU."""

  BACKEND = "gpu"
  INTERPRET = True
  # The smallest wgmma tiles, and the widest code block (wgmma N = 256),
  # where the tie test's copies 130 codes apart share a block.
  TILES = (ap.TileSizes(64, 64), ap.TileSizes(64, 256))

  @pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
  def test_wide_features_stream_tokens(self, dtype):
    # A [64, D] token tile of 2000 bf16 values (fp32: 666 as three bf16
    # pieces) cannot stay in SMEM, so x streams through it with the codes.
    pieces = 3 if dtype == jnp.float32 else 1
    dim = 2000 // pieces
    assert not argmin_mosaic_gpu._gpu_plan(64, 64, dim, pieces, 3).resident_x
    x, codebook = random_inputs(20, 150, dim, dtype, seed=7)
    got = self.run(x, codebook, self.TILES[0])
    assert_as_near(x, codebook, got, TOLERANCE[dtype])

  def test_sharded_tokens_replicated_codebook(self):
    if self.INTERPRET:
      # JAX's GPU interpreter cannot run one kernel on several devices at
      # once: 0.10 deadlocks in its clean-up barrier, 0.12's check that no
      # mbarrier is left allocated sees the other devices' barriers. The
      # TPU-interpreted class covers the shard_map wiring.
      pytest.skip("the GPU interpreter runs one device at a time")
    super().test_sharded_tokens_replicated_codebook()


@pytest.mark.tpu
class TestTpuKernelCompiled(TestTpuKernelInterpret):
  INTERPRET = False


@pytest.mark.gpu
class TestGpuKernelCompiled(TestGpuKernelInterpret):
  INTERPRET = False


def lowered_module(platform, backend, dtype, shapes=((300, 24), (700, 24))):
  """StableHLO text of the compiled (not interpreted) kernel for `platform`."""
  fn = jax.jit(
      functools.partial(ap.argmin_pallas, backend=backend, interpret=False)
  )
  target = {"tpu": "tpu_custom_call", "cuda": "mosaic_gpu_v2"}[platform]
  # Kernel calls carry no serialization guarantee; we only inspect them.
  unchecked = [export.DisabledSafetyCheck.custom_call(target)]
  exported = export.export(fn, platforms=[platform], disabled_checks=unchecked)(
      *(jax.ShapeDtypeStruct(shape, dtype) for shape in shapes)
  )
  text = exported.mlir_module()
  assert target in set(re.findall(r"custom_call @(\S+?)\(", text))
  return text


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_lowers_for_tpu(dtype):
  # Mosaic lowering runs without the device, so ops the TPU cannot lower
  # fail here even on a CPU host.
  lowered_module("tpu", "tpu", dtype)


# What an H100 reports; Mosaic GPU reads no compute capability from it.
H100 = jax.sharding.AbstractDevice(
    device_kind="NVIDIA H100 80GB HBM3", num_cores=132, platform="gpu"
)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize(
    "shapes", [((300, 24), (700, 24)), ((1000, 1024), (300, 1024))]
)
def test_lowers_for_h100(dtype, shapes):
  # Pallas -> Mosaic GPU -> the custom call's serialized module all run on
  # the host; only ptxas waits for a GPU. With no GPU device (or an abstract
  # one, which carries no compute capability) Mosaic targets sm_90, Hopper.
  # The second shape is too wide for a resident token tile (x streams).
  mesh = jax.sharding.AbstractMesh(
      (1,), ("x",), (jax.sharding.AxisType.Explicit,), abstract_device=H100
  )
  with jax.sharding.use_abstract_mesh(mesh):
    text = lowered_module("cuda", "gpu", dtype, shapes)
  # The module is embedded as MLIR bytecode, whose strings stay readable:
  # Hopper's async tensor-core MMA on bf16 pieces, fed by TMA copies.
  assert "wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16" in text
  assert "cp.async.bulk.tensor" in text


def test_tile_validation():
  for bad in [(0, 128), (128, -8), (100, 128), (128, 12)]:
    with pytest.raises(ValueError, match="multiple of 8"):
      ap.TileSizes(*bad)
  with pytest.raises(ValueError, match="multiples of 128"):
    ap.TileSizes(64, 128).check("tpu")
  for bad in [(64, 96), (32, 64), (64, 320)]:
    with pytest.raises(ValueError, match="multiples of 64"):
      ap.TileSizes(*bad).check("gpu")
  with pytest.raises(ValueError, match="registers"):
    ap.TileSizes(128, 256).check("gpu")
  for backend, kernel in [("tpu", "tpu"), ("gpu", "gpu"), ("cpu", "tpu")]:
    ap.default_tiles(backend).check(kernel)
  with pytest.raises(ValueError, match="backend"):
    ap.default_tiles("metal")
  x, codebook = random_inputs(8, 8, 4, jnp.float32)
  with pytest.raises(ValueError, match="multiples of 128"):
    ap.argmin_pallas(x, codebook, tiles=ap.TileSizes(16, 16), backend="tpu")


@pytest.mark.parametrize(
    "x_shape,cb_shape",
    [((4, 3), (5, 4)), ((4,), (5, 4)), ((4, 3), (0, 3))],
)
def test_bad_shapes_name_both(x_shape, cb_shape):
  with pytest.raises(ValueError) as error:
    ap.argmin_pallas(jnp.zeros(x_shape), jnp.zeros(cb_shape))
  assert str(x_shape) in str(error.value)
  assert str(cb_shape) in str(error.value)


def test_mixed_dtypes_rejected():
  with pytest.raises(ValueError, match="share a dtype"):
    ap.argmin_pallas(jnp.zeros((4, 3)), jnp.zeros((5, 3), jnp.bfloat16))


def test_cpu_default_runs_tpu_kernel_interpreted():
  if jax.default_backend() != "cpu":
    pytest.skip("checks the CPU-host default")
  x, codebook = random_inputs(50, 60, 8, jnp.float32, seed=6)
  np.testing.assert_array_equal(
      ap.argmin_pallas(x, codebook), argmin.reference(x, codebook)
  )


def _pallas_operand_rows(jaxpr) -> list[int]:
  """Token rows of every pallas_call's first operand, at any depth."""
  rows = []
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == "pallas_call":
      rows.append(eqn.invars[0].aval.shape[0])
    for value in eqn.params.values():
      for sub in value if isinstance(value, (list, tuple)) else [value]:
        sub = getattr(sub, "jaxpr", sub)  # ClosedJaxpr -> Jaxpr
        if hasattr(sub, "eqns"):
          rows += _pallas_operand_rows(sub)
  return rows


@pytest.mark.parametrize("mesh_shape", [(1, 8), (2, 4), (8, 1)])
def test_codebook_search_runs_per_shard_over_every_batch_axis(mesh_shape):
  """Under a data x fsdp mesh the kernel sees only its device's rows (no
  device gathers the tokens), and the result equals the reference."""
  mesh = jax.make_mesh(mesh_shape, ("data", "fsdp"))
  n = 8 * 128  # a whole 128-row tile per device: no padding to hide it
  x, codebook = random_inputs(n, 40, 8, jnp.float32, seed=3)
  x = jax.device_put(x, NamedSharding(mesh, P(("data", "fsdp"))))
  search = jax.jit(functools.partial(argmin.codebook_argmin, impl="pallas"))
  with jax.set_mesh(mesh):
    jaxpr = jax.make_jaxpr(search)(x, codebook)
    got = search(x, codebook)
  assert _pallas_operand_rows(jaxpr.jaxpr) == [n // 8]
  np.testing.assert_array_equal(got, argmin.reference(x, codebook))
