"""Class-conditional CAR: class prompts, the class table, the ADM batch."""

import dataclasses
import gzip

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

from configs import car_stage1, car_stage2
from conftest import tiny_config
from cvqcar import checkpoint, sharding
from cvqcar.car import benchmark
from cvqcar.car import state as car_state
from cvqcar.car import trainer as car_trainer
from cvqcar.data import pairs, text


def test_class_prompts_are_class_indices():
  tok = text.load_text_tokenizer("classes:10")
  assert tok.encode("7") == [7] and tok.encode("") == []
  assert tok.vocab_size == 10
  for bad in ("10", "cat", "-1"):
    with pytest.raises(ValueError, match="class index in 0..9"):
      tok.encode(bad)
  ids, mask = text.batch_encode(tok, ["3", ""], 1, truncate=False)
  np.testing.assert_array_equal(ids[:, 0], [3, 0])
  np.testing.assert_array_equal(mask[:, 0], [1, 0])


def test_c2i_configs():
  config = car_stage2.get_config("tiny,c2i,fashion")
  assert config.num_classes == 10 and config.max_text_len == 1
  assert config.data.name == "fashion_mnist"
  assert config.init_from == "runs/car1_c2i_fashion"
  assert car_trainer.resolve_text_tokenizer(config) == "classes:10"
  full = car_stage1.get_config("c2i")
  assert full.num_classes == 1000 and full.data.name == "imagenet2012"
  assert full.tokenizer.resolution == 256
  assert car_trainer.resolve_text_tokenizer(car_stage1.get_config(
      "tiny")) == "bytes"  # text-conditioned configs are unchanged


def c2i_config():
  config = car_stage2.get_config("tiny,c2i,fashion")
  config.tokenizer = tiny_config().model
  config.text_tokenizer = car_trainer.resolve_text_tokenizer(config)
  config.llm_config = dataclasses.asdict(
      car_state.resolve_llm_config(config))
  return config


def one_device(config):
  one = ml_collections.ConfigDict(config.to_dict())
  one.batch_size = 1
  one.mesh = ml_collections.ConfigDict({"data": 1, "fsdp": 1, "model": 1})
  return one, sharding.make_mesh(one, jax.devices()[:1])


def codebook(config):
  k, _, dim = car_state.tokenizer_shape(config.tokenizer)
  return np.random.default_rng(0).normal(size=(k, dim)).astype(np.float32)


def test_the_class_conditions_and_a_masked_class_is_unconditional():
  config = c2i_config()
  one, mesh = one_device(config)
  graphdef, state, _ = car_state.init_state(one, mesh, codebook(config))
  model = state.model(graphdef)
  width = config.llm_config["hidden_size"]
  assert model.class_embed.embedding[...].shape == (10, width)
  tokens = jnp.zeros((10, 8), jnp.int32)
  classes = jnp.arange(10)[:, None]
  on = model(classes, jnp.ones((10, 1), jnp.int32), tokens)
  off = model(classes, jnp.zeros((10, 1), jnp.int32), tokens)
  # Each class gives its own logits; masked, every class gives the same.
  assert float(jnp.abs(on[0] - on[1]).max()) > 1e-4
  np.testing.assert_allclose(off, jnp.broadcast_to(off[:1], off.shape),
                             atol=1e-6)
  # Stage I trains the class table (the backbone stays frozen).
  _, params, _, _ = car_state.split(model, 1)
  assert any("class_embed" in "/".join(map(str, path))
             for path, _ in nnx.to_flat_state(params))


def write_idx(path, array):
  header = bytes([0, 0, 8, array.ndim]) + b"".join(
      int(d).to_bytes(4, "big") for d in array.shape)
  with gzip.open(path, "wb") as f:
    f.write(header + array.astype(np.uint8).tobytes())


@pytest.fixture
def fashion_dir(tmp_path):
  """Fashion-MNIST's four IDX files, 40 random images of known labels."""
  rng = np.random.default_rng(0)
  for prefix, n in (("train", 40), ("t10k", 20)):
    write_idx(tmp_path / f"{prefix}-images-idx3-ubyte.gz",
              rng.integers(0, 256, (n, 28, 28)))
    write_idx(tmp_path / f"{prefix}-labels-idx1-ubyte.gz",
              np.arange(n) % 10)
  return str(tmp_path)


def test_c2i_pairs_carry_the_label_as_the_prompt(fashion_dir):
  config = c2i_config()
  config.data.data_dir = fashion_dir
  config.batch_size = 8
  tok = text.load_text_tokenizer(config.text_tokenizer)
  batch = next(iter(pairs.eval_dataset(config, tok)))
  np.testing.assert_array_equal(batch["text"][:, 0], np.arange(8) % 10)
  assert batch["text_mask"].all()
  config.num_classes = 1000
  with pytest.raises(ValueError, match="num_classes=1000, but fashion_mnist"
                     " has 10 classes"):
    pairs.train_dataset(config, tok)


@pytest.mark.slow
def test_c2i_stage1_trains_on_labelled_images(fashion_dir, tokenizer_export,
                                              tmp_path):
  config = car_stage1.get_config("tiny,c2i,fashion")
  config.tokenizer = tiny_config().model
  config.tokenizer_export = tokenizer_export
  config.data.data_dir = fashion_dir
  config.batch_size = 8
  config.num_train_steps = 2
  config.data.num_eval_examples = 8
  config.eval_every = 1000
  config.sample.prompts = ("3",)
  car_trainer.train_and_evaluate(config, str(tmp_path / "run"))
  model, saved = car_trainer.load_from_workdir(str(tmp_path / "run"))
  assert saved.num_classes == 10
  assert model.class_embed.embedding[...].shape[0] == 10


@pytest.fixture(scope="module")
def c2i_export(tmp_path_factory):
  config = c2i_config()
  one, mesh = one_device(config)
  _, state, _ = car_state.init_state(one, mesh, codebook(config))
  out = str(tmp_path_factory.mktemp("c2i") / "export")
  return checkpoint.save_export(out, config, {
      "params": state.params, "backbone": state.backbone,
      "frozen": state.frozen})


def test_imagenet_c2i_writes_the_adm_sample_batch(c2i_export,
                                                 tokenizer_export, tmp_path):
  out = tmp_path / "c2i"
  done = benchmark.generate_benchmark(
      "imagenet_c2i", "", c2i_export, tokenizer_export, str(out),
      num_images=3, batch_size=8, param_dtype="float32")
  assert done == [f"{c:04d}" for c in range(10)]
  batch = np.load(out / "samples_30x16x16x3.npz")
  images, labels = batch["arr_0"], batch["arr_1"]
  assert images.dtype == np.uint8 and images.shape == (30, 16, 16, 3)
  np.testing.assert_array_equal(labels, np.repeat(np.arange(10), 3))
  from PIL import Image
  np.testing.assert_array_equal(
      images[7], np.asarray(Image.open(out / "0002" / "0001.png")))
  tokens = np.load(out / "0002" / "tokens.npy")
  assert tokens.shape == (3, 8)
  # Resumable: nothing left to do, and the batch is written again alike.
  assert benchmark.generate_benchmark(
      "imagenet_c2i", "", c2i_export, tokenizer_export, str(out),
      num_images=3, batch_size=8, param_dtype="float32") == []
  np.testing.assert_array_equal(
      np.load(out / "samples_30x16x16x3.npz")["arr_0"], images)
  # Sample n of class c is named by (seed, c, n): a run of two classes
  # draws the same tokens for them.
  subset = tmp_path / "classes.txt"
  subset.write_text("2\n7\n")
  part = tmp_path / "part"
  benchmark.generate_benchmark(
      "imagenet_c2i", str(subset), c2i_export, tokenizer_export, str(part),
      num_images=3, batch_size=4, param_dtype="float32")
  for c in (2, 7):
    np.testing.assert_array_equal(np.load(part / f"{c:04d}" / "tokens.npy"),
                                  np.load(out / f"{c:04d}" / "tokens.npy"))
  assert (part / "samples_6x16x16x3.npz").exists()


def test_imagenet_c2i_needs_a_class_conditional_car(tmp_path):
  with pytest.raises(ValueError, match="needs a class-conditional CAR"):
    benchmark.class_prompts("", 0)
  path = tmp_path / "classes.txt"
  path.write_text("3\n12\n")
  with pytest.raises(ValueError, match=r"classes \[12\] outside 0..9"):
    benchmark.class_prompts(str(path), 10)
