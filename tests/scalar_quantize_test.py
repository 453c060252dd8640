"""FSQ, LFQ and BSQ: against vector-quantize-pytorch on the same inputs and
weights; they, residual VQ and the IBQ and rotation-trick codebooks through
the tokenizer along both axes."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch_references
from flax import nnx

from conftest import tiny_config
from cvqcar.tokenizer import model as model_lib
from cvqcar.tokenizer import scalar


def _vqp():
  torch_references.torchvision()
  return pytest.importorskip("vector_quantize_pytorch")


def _copy_projection(ours, theirs):
  """Our D -> d -> D maps take the reference's weights."""
  for mine, ref in ((ours.proj.inp, theirs.project_in),
                    (ours.proj.out, theirs.project_out)):
    mine.kernel[...] = jnp.asarray(ref.weight.detach().numpy().T)
    mine.bias[...] = jnp.asarray(ref.bias.detach().numpy())


@pytest.mark.parametrize("dim", [4, 16])  # 16: with projections
def test_fsq_matches_vector_quantize_pytorch(dim):
  vqp = _vqp()
  import torch

  levels = (8, 5, 5, 5)
  torch.manual_seed(0)
  ref = vqp.FSQ(levels=list(levels), dim=dim)
  ours = scalar.FSQ(levels, dim, rngs=nnx.Rngs(0))
  if dim != len(levels):
    _copy_projection(ours, ref)
  x = np.random.default_rng(0).normal(size=(300, dim)).astype(np.float32) * 2
  with torch.no_grad():
    want, want_idx = ref(torch.as_tensor(x)[None])
  out = ours(jnp.asarray(x))
  np.testing.assert_array_equal(np.asarray(out.indices), want_idx[0].numpy())
  np.testing.assert_allclose(np.asarray(out.quantized), want[0].numpy(),
                             atol=1e-5)
  assert len(np.unique(np.asarray(out.indices))) > 50  # many codes in use
  assert 0 <= int(out.indices.min()) and int(out.indices.max()) < 1000
  # lookup(indices) is the forward value; the implicit codebook holds each.
  np.testing.assert_allclose(np.asarray(ours.lookup(out.indices)),
                             np.asarray(out.quantized), atol=1e-5)
  codebook = np.asarray(ours.codebook())
  assert codebook.shape == (ours.num_codes, dim) == (1000, dim)
  np.testing.assert_allclose(codebook[np.asarray(out.indices)],
                             np.asarray(out.quantized), atol=1e-5)
  if dim == len(levels):  # every code is a distinct point of the grid
    assert len({tuple(r) for r in np.round(codebook, 5)}) == 1000


@pytest.mark.parametrize("spherical", [False, True])  # LFQ, BSQ
@pytest.mark.parametrize("dim", [6, 20])
def test_lfq_and_bsq_match_vector_quantize_pytorch(spherical, dim):
  vqp = _vqp()
  import torch

  torch.manual_seed(0)
  x = np.random.default_rng(1).normal(size=(2, 40, dim)).astype(np.float32)
  ours = scalar.LFQ(6, dim, spherical=spherical, entropy_weight=1.0,
                    rngs=nnx.Rngs(0))
  refs = {}
  for name, weights in (("entropy", (1.0, 0.0)), ("commit", (0.0, 1.0))):
    torch.manual_seed(0)
    ref = vqp.LFQ(dim=dim, codebook_size=64, spherical=spherical,
                  entropy_loss_weight=weights[0],
                  commitment_loss_weight=weights[1]).train()
    refs[name] = ref(torch.as_tensor(x))
  if dim != 6:
    _copy_projection(ours, ref)
  weight = np.ones(80, np.float32)
  out = ours(jnp.asarray(x.reshape(80, dim)), jnp.asarray(weight), train=True)
  want, want_idx, entropy = refs["entropy"]
  np.testing.assert_array_equal(np.asarray(out.indices),
                                want_idx.numpy().reshape(-1))
  np.testing.assert_allclose(np.asarray(out.quantized),
                             want.detach().numpy().reshape(80, dim),
                             atol=1e-5)
  np.testing.assert_allclose(float(out.codebook_loss),
                             float(entropy.detach()), rtol=1e-4)
  np.testing.assert_allclose(float(out.commitment_loss),
                             float(refs["commit"][2].detach()), rtol=1e-5)
  codes = np.asarray(ours.indices_to_codes(out.indices))
  norms = np.linalg.norm(codes, axis=-1)
  np.testing.assert_allclose(norms, 1.0 if spherical else np.sqrt(6),
                             rtol=1e-6)
  # Rows with weight 0 leave the losses.
  half = ours(jnp.asarray(x.reshape(80, dim)),
              jnp.asarray(np.r_[np.ones(40), np.zeros(40)]), train=True)
  first = ours(jnp.asarray(x.reshape(80, dim)[:40]), train=True)
  np.testing.assert_allclose(float(half.codebook_loss),
                             float(first.codebook_loss), rtol=1e-5)
  assert float(ours(jnp.asarray(x[0])).codebook_loss) == 0.0  # eval


@pytest.mark.parametrize("name", ["fsq", "lfq", "bsq"])
def test_gradient_passes_the_quantizer_straight_through(name):
  rows = model_lib._row_quantizer(
      _config(name, "channel").model, 12, nnx.Rngs(0))
  x = jnp.asarray(np.random.default_rng(0).normal(size=(16, 12)),
                  jnp.float32)
  w = jnp.asarray(np.random.default_rng(1).normal(size=(16, 12)),
                  jnp.float32)

  def loss(x):
    out = rows(x, train=True)
    return jnp.sum(out.quantized * w) + out.codebook_loss

  grad = np.asarray(jax.grad(loss)(x))
  assert np.all(np.isfinite(grad)) and np.mean(np.abs(grad) > 0) > 0.9


def _config(name, axis):
  config = tiny_config()
  if name == "rvq":  # residual VQ: 3 codes a token
    config.model.rvq_depth, name = 3, "vq"
  if name in ("ibq", "rotation"):  # codebook quantizers, other estimators
    config.model.codebook.ema = False
    config.model.codebook.index_backprop = name == "ibq"
    config.model.codebook.rotation = name == "rotation"
    name = "vq"
  config.model.quantizer = name
  config.model.scalar.fsq_levels = (4, 4, 4)
  config.model.scalar.bits = 6
  config.model.num_codes = 64
  if axis == "patch":
    config.model.quantize = "patch"
    config.model.nested_dropout_alpha = 0.0
  return config


@pytest.mark.parametrize("name,axis", [
    ("fsq", "channel"), ("lfq", "channel"), ("bsq", "channel"),
    ("ibq", "channel"), ("rotation", "channel"), ("rvq", "channel"),
    ("fsq", "patch"), ("lfq", "patch"), ("bsq", "patch"), ("ibq", "patch"),
    ("rotation", "patch"), ("rvq", "patch")])
def test_tokenizer_round_trips_and_trains_the_encoder(name, axis):
  config = _config(name, axis)
  model = model_lib.Tokenizer(config.model, rngs=nnx.Rngs(0))
  images = jnp.asarray(np.random.default_rng(0).uniform(
      -1, 1, (4, 16, 16, 3)), jnp.float32)
  out = model(images, train=False)
  tokens = model.encode(images)
  assert tokens.shape == (4, model.num_tokens)
  assert 0 <= int(tokens.min()) and int(tokens.max()) < 64
  np.testing.assert_allclose(np.asarray(model.decode(tokens)),
                             np.asarray(out.reconstructions), atol=1e-5)
  if axis == "channel":  # the coarse-to-fine prefix decodes too
    assert model.decode(tokens[:, :3]).shape == images.shape

  def loss(model):
    out = model(images, train=True, key=jax.random.key(0))
    return (jnp.mean(jnp.square(out.reconstructions - images)) +
            out.codebook_loss + out.commitment_loss)

  grads = nnx.grad(loss)(model)
  encoder = jax.tree.leaves(nnx.state(grads.encoder, nnx.Param))
  assert sum(float(jnp.sum(jnp.abs(g))) for g in encoder) > 0


def test_config_arguments_and_mismatches():
  from configs import cvq_tokenizer

  for name, want in (("fsq", (8, 5, 5, 5)), ("lfq", 10), ("bsq", 10)):
    config = cvq_tokenizer.get_config(f"tiny,{name}")
    config.model.num_codes = 1024
    cvq_tokenizer.set_scalar_quantizer(config.model, name)
    m = config.model
    assert m.quantizer == name
    got = tuple(m.scalar.fsq_levels) if name == "fsq" else m.scalar.bits
    assert got == want
    model_lib.check_model_config(m)
  config = _config("lfq", "channel")
  config.model.num_codes = 100
  with pytest.raises(ValueError, match="num_codes=100 but quantizer='lfq'"
                     " has 64 codes"):
    model_lib.check_model_config(config.model)
  with pytest.raises(ValueError, match="give one"):
    cvq_tokenizer.get_config("tiny,fsq,lfq")


@pytest.mark.slow
@pytest.mark.parametrize("arg", ["fsq", "bsq,patch", "rvq=4"])
def test_train_export_evaluate(arg, tmp_path):
  """What `python -m cvqcar.train --config=...:tiny,smoke,NAME` runs, then
  the export and the evaluate command's job (LFQ is BSQ off the sphere;
  the round-trip and gradient tests above take all of them)."""
  from configs import cvq_tokenizer
  from cvqcar.tokenizer import eval_job, export
  from cvqcar.tokenizer import trainer as tokenizer_trainer

  config = cvq_tokenizer.get_config(f"tiny,smoke,{arg}")
  config.num_train_steps = 2
  summary = tokenizer_trainer.train_and_evaluate(config, str(tmp_path / "w"))
  assert summary.last_step == 2
  assert all(np.isfinite(s["train/loss"]) for s in summary.train.values())
  out = export.export(str(tmp_path / "w"), str(tmp_path / "export"))
  tokenizer = export.load_tokenizer(out)
  assert tokenizer.quantizer.vq.num_codes == config.model.num_codes == 64
  assert tokenizer.num_tokens == model_lib.num_tokens(config.model)
  assert tokenizer.codes_per_token == config.model.rvq_depth
  result = eval_job.evaluate_export(out, out=str(tmp_path / "eval"),
                                    batch_size=8, num_images=16)
  assert result["images"] == 16 and 0 < result["codebook_usage"] <= 1
  assert result["psnr"] > 0


@pytest.mark.parametrize("spherical", [False, True])
def test_chunked_entropy_matches_the_full_matrix(spherical, monkeypatch):
  """The entropy in row chunks (padded, rematerialized) against the
  formula over the whole [N, K] matrix: value and gradient."""
  monkeypatch.setattr(scalar, "ENTROPY_CHUNK", 64)
  lfq = scalar.LFQ(5, 5, spherical=spherical, temperature=0.5,
                   diversity_gamma=0.7, rngs=nnx.Rngs(0))
  rng = np.random.default_rng(0)
  z = jnp.asarray(rng.normal(size=(150, 5)), jnp.float32)  # 3 chunks
  w = jnp.asarray(rng.uniform(size=150) > 0.3, jnp.float32)

  def full(z):
    codes = lfq.indices_to_codes(jnp.arange(32))
    p = jax.nn.softmax(2 * z @ codes.T / 0.5, axis=-1)
    log = lambda p: jnp.log(jnp.maximum(p, 1e-5))
    rows = jnp.sum(-jnp.sum(p * log(p), -1) * w) / jnp.sum(w)
    mean_p = jnp.sum(p * w[:, None], 0) / jnp.sum(w)
    return rows - 0.7 * -jnp.sum(mean_p * log(mean_p))

  np.testing.assert_allclose(float(lfq.entropy_loss(z, w)), float(full(z)),
                             rtol=1e-5)
  np.testing.assert_allclose(
      np.asarray(jax.grad(lambda z: lfq.entropy_loss(z, w))(z)),
      np.asarray(jax.grad(full)(z)), atol=1e-5)
