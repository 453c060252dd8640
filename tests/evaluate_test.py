"""The evaluate command: every image counted once, corrupt ones counted,
weights optional, the same numbers with one process or two."""

import json
import os
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from PIL import Image

from conftest import run_processes, tiny_config
from cvqcar import metrics, visualize
from cvqcar.car import pipeline
from cvqcar.data import images as image_data
from cvqcar.evaluation import fid, inception
from cvqcar.tokenizer import eval_job, evaluate, export, lpips


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
  """100 photo crops as PNG files, plus one corrupt file."""
  root = tmp_path_factory.mktemp("images")
  rng = np.random.default_rng(0)
  photos = [r["image"] for r in image_data.embedded_photos("train")]
  for i in range(100):
    p = photos[i % len(photos)]
    top = rng.integers(0, p.shape[0] - 40)
    left = rng.integers(0, p.shape[1] - 40)
    Image.fromarray(p[top:top + 40, left:left + 40]).save(
        root / f"img{i:03d}.png")
  (root / "img050_broken.png").write_bytes(b"\x89PNG not really")
  return str(root)


def test_every_image_counted_once_and_corrupt_ones_skipped(
    tokenizer_export, folder, tmp_path, capsys):
  result = eval_job.evaluate_export(
      tokenizer_export, data=f"folder:{folder}", out=str(tmp_path),
      batch_size=32)
  assert result["images"] == 100 and result["skipped_corrupt"] == 1
  assert set(result["skipped_metrics"]) == {"rfid", "lpips"}
  assert "--inception" in result["skipped_metrics"]["rfid"]
  with open(tmp_path / "metrics.json") as f:
    saved = json.load(f)
  assert saved["images"] == 100 and 0 < saved["codebook_usage"] <= 1
  row = (tmp_path / "metrics.md").read_text().splitlines()[-1]
  assert row.startswith("| export | 100 | n/a |")
  # The mean is over exactly the 100 real images (padding masked out).
  tokenizer = export.load_tokenizer(tokenizer_export)
  records, preprocess, _ = eval_job.eval_source(
      f"folder:{folder}", tiny_config(), 0)
  images = [preprocess(records[i], None) for i in range(len(records))]
  images = np.stack([x["image"] for x in images if not x["corrupt"]])
  recon = tokenizer(images, train=False).reconstructions
  want = float(np.mean(metrics.psnr(recon, images)))
  np.testing.assert_allclose(result["psnr"], want, rtol=1e-5)
  # The coarse-to-fine curve: PSNR from the first k of the C = 8 channels.
  assert {k for k in result if k.startswith("psnr_first_")} == {
      f"psnr_first_{k}" for k in metrics.prefix_lengths(8)}


def test_lpips_and_rfid_with_weight_files(tokenizer_export, folder,
                                          tmp_path):
  path = tmp_path / "lpips.npz"
  model = lpips.LPIPS(rngs=nnx.Rngs(0))
  model.save(str(path))
  result = eval_job.evaluate_export(
      tokenizer_export, data=f"folder:{folder}", names=["lpips", "psnr"],
      out=str(tmp_path / "out"), batch_size=16, num_images=20,
      lpips_path=str(path))
  assert result["images"] == 20 and result["lpips"] > 0
  assert "ssim" not in result and "codebook_usage" not in result
  assert result["skipped_metrics"] == {}


def test_rfid_on_the_embedded_set(tokenizer_export, tmp_path):
  import torch_references

  _, state = torch_references.fid_inception()
  np.savez(tmp_path / "inception.npz", **state)
  result = eval_job.evaluate_export(
      tokenizer_export, names=["rfid", "psnr", "ssim", "usage"],
      out=str(tmp_path / "out"), batch_size=8, num_images=12,
      inception_path=str(tmp_path / "inception.npz"))
  assert result["images"] == 12 and result["data"] == "embedded"
  # Random weights: a finite distance (rank-deficient 12-image covariances
  # can leave sqrtm a hair below zero); parity is evaluation_test's job.
  assert np.isfinite(result["rfid"]) and result["rfid"] > -1e-3
  assert result["rfid_reference"] == "the same real images"
  assert result["rfid_protocol"] == "uint8"  # the default, as published
  header = (tmp_path / "out" / "metrics.md").read_text().splitlines()[0]
  assert "| rFID (uint8) |" in header
  for key in ("psnr", "ssim", "codebook_usage", "codebook_perplexity"):
    assert key in result
  assert "lpips" not in result and result["skipped_metrics"] == {}


class _Fixed:
  """A stand-in tokenizer with a given reconstruction."""

  quantize = "patch"

  def __init__(self, reconstructions):
    self.reconstructions = reconstructions

  def __call__(self, images, train):
    b = images.shape[0]
    return types.SimpleNamespace(
        reconstructions=self.reconstructions,
        indices=jnp.zeros((b, 1), jnp.int32),
        index_weight=jnp.ones((b, 1)), code_counts=jnp.zeros((4,)))


def test_quantize_uint8_rounds_images_before_inception(tmp_path,
                                                       monkeypatch):
  # Inception's "features" here are the pixels it is given.
  monkeypatch.setattr(inception, "features",
                      lambda weights, x: x.reshape(x.shape[0], -1))
  rng = np.random.default_rng(0)
  images = rng.uniform(-1, 1, (3, 8, 8, 3)).astype(np.float32)  # off-grid
  levels = visualize.to_uint8(images).astype(np.float32)
  on_grid = levels / 127.5 - 1  # the images as uint8 files hold them
  # Reconstructions less than half a level off the real images' levels.
  recon = (levels + rng.uniform(-0.4, 0.4, images.shape)) / 127.5 - 1
  mask = np.ones(3, np.float32)
  model = _Fixed(jnp.asarray(recon, jnp.float32))
  seen = {q: jax.jit(lambda x, m, q=q: evaluate.batch_metrics(
      model, x, m, evaluate.Weights(inception={}), None,
      quantize_uint8=q)[2])(images, mask) for q in (True, False)}
  want = fid.feature_sums(on_grid.reshape(3, -1), mask)
  for name in ("real", "recon"):
    # Rounded: Inception sees the 8-bit images, real and reconstructed the
    # same (rFID 0).
    for key in ("sum", "outer"):
      np.testing.assert_allclose(seen[True][name][key], want[key],
                                 atol=1e-6, err_msg=(name, key))
    # Unrounded: the off-grid real images and the sub-level noise show.
    assert np.max(np.abs(seen[False][name]["sum"] - want["sum"])) > 1e-3
  np.testing.assert_allclose(
      seen[False]["real"]["sum"], images.reshape(3, -1).sum(0), atol=1e-6)
  # The markdown row names the protocol.
  for protocol in ("uint8", "float"):
    result = {"images": 3, "rfid": 1.0, "rfid_protocol": protocol}
    table = evaluate.write_results(str(tmp_path), result, "x")
    assert f"| rFID ({protocol}) |" in table


@pytest.mark.slow
def test_two_processes_give_the_numbers_of_one(tokenizer_export, folder,
                                               tmp_path):
  def run(processes):
    out = tmp_path / f"p{processes}"
    run_processes(["cvqcar.evaluate", f"--tokenizer={tokenizer_export}",
                   f"--data=folder:{folder}", f"--out={out}",
                   "--batch_size=32"], processes)
    with open(out / "metrics.json") as f:
      return json.load(f)

  one, two = run(1), run(2)
  assert one["images"] == two["images"] == 100
  assert one["skipped_corrupt"] == two["skipped_corrupt"] == 1
  for key in ("psnr", "ssim", "codebook_usage", "codebook_perplexity"):
    np.testing.assert_allclose(two[key], one[key], rtol=1e-5, err_msg=key)
  assert jax.device_count() == 8


@pytest.fixture(scope="module")
def car_export_dir(tokenizer_export, tmp_path_factory):
  from configs import car_stage1
  from cvqcar.car import export as car_export
  from cvqcar.car import trainer as car_trainer

  root = tmp_path_factory.mktemp("car")
  config = car_stage1.get_config("tiny")
  config.tokenizer = tiny_config().model
  config.tokenizer_export = tokenizer_export
  config.batch_size = 8
  config.num_train_steps = 1
  config.data.num_eval_examples = 8
  config.eval_every = 1000
  config.sample.prompts = ("a cat",)
  car_trainer.train_and_evaluate(config, str(root / "run"))
  return car_export.export_car(str(root / "run"), str(root / "export"))


def test_generate_benchmark_layouts_and_resume(tokenizer_export,
                                               car_export_dir, tmp_path):
  from cvqcar.car import benchmark

  prompts = [f"a photo of {n}" for n in ("a cat", "two dogs", "a red cup",
             "a bench", "a tree", "a car", "three birds", "a clock",
             "a blue vase", "an apple")]
  lines = [json.dumps({"prompt": p, "tag": "single_object", "n": i})
           for i, p in enumerate(prompts)]
  geneval_file = tmp_path / "evaluation_metadata.jsonl"
  geneval_file.write_text("\n".join(lines) + "\n")
  out = tmp_path / "geneval"
  done = benchmark.generate_benchmark(
      "geneval", str(geneval_file), car_export_dir, tokenizer_export,
      str(out), num_images=3, batch_size=8)
  assert len(done) == 10
  assert sorted(os.listdir(out)) == [f"{i:05d}" for i in range(10)]
  for i in range(10):
    folder = out / f"{i:05d}"
    assert sorted(os.listdir(folder / "samples")) == [
        "0000.png", "0001.png", "0002.png"]
    meta = json.loads((folder / "metadata.jsonl").read_text())
    assert meta == json.loads(lines[i])
  with Image.open(out / "00003" / "samples" / "0001.png") as im:
    assert im.size == (16, 16)
  # Each prompt's tokens lie beside its images and decode to them.
  tokens = {i: np.load(out / f"{i:05d}" / "tokens.npy") for i in range(10)}
  assert tokens[0].shape == (3, 8) and tokens[0].dtype == np.int32
  decoded = visualize.to_uint8(np.asarray(export.load_tokenizer(
      tokenizer_export).decode(tokens[3])))
  for j in range(3):
    png = np.asarray(Image.open(out / "00003" / "samples" / f"{j:04d}.png"))
    np.testing.assert_allclose(png, decoded[j], atol=1)
  # A second run skips what is written; a prompt missing an image or its
  # tokens is redone, with the same samples.
  os.remove(out / "00004" / "samples" / "0002.png")
  os.remove(out / "00006" / "tokens.npy")
  again = benchmark.generate_benchmark(
      "geneval", str(geneval_file), car_export_dir, tokenizer_export,
      str(out), num_images=3, batch_size=8)
  assert again == ["00004", "00006"]
  for i in (4, 6):
    np.testing.assert_array_equal(
        np.load(out / f"{i:05d}" / "tokens.npy"), tokens[i])
  # Another batch size (samples of a prompt split over other batches)
  # draws the same samples.
  first4 = tmp_path / "first4.jsonl"
  first4.write_text("\n".join(lines[:4]) + "\n")
  benchmark.generate_benchmark(
      "geneval", str(first4), car_export_dir, tokenizer_export,
      str(tmp_path / "batch5"), num_images=3, batch_size=5)
  for i in range(4):
    np.testing.assert_array_equal(
        np.load(tmp_path / "batch5" / f"{i:05d}" / "tokens.npy"), tokens[i])
  # The sample command's seed s, prompt i is the benchmark's sample 0.
  written = pipeline.sample_to_files(
      car_export_dir, tokenizer_export, prompts[:2], str(tmp_path / "s"),
      save_tokens=True)
  saved = sorted(p for p in written if p.endswith("_tokens.npy"))
  assert len(saved) == 2
  for i, path in enumerate(saved):
    np.testing.assert_array_equal(np.load(path), tokens[i][0])
  # DPG-Bench: <id>.txt prompts in, <id>.png 2 x 2 grids out.
  prompt_dir = tmp_path / "dpg_prompts"
  prompt_dir.mkdir()
  for i, p in enumerate(prompts[:3]):
    (prompt_dir / f"item{i}.txt").write_text(p)
  dpg = tmp_path / "dpg"
  benchmark.generate_benchmark("dpg", str(prompt_dir), car_export_dir,
                               tokenizer_export, str(dpg), batch_size=8)
  assert sorted(os.listdir(dpg)) == ["item0.png", "item1.png", "item2.png",
                                     "tokens"]
  with Image.open(dpg / "item1.png") as im:
    assert im.size == (32, 32)  # 2 x 2 samples of 16 px
  assert np.load(dpg / "tokens" / "item1.npy").shape == (4, 8)


@pytest.mark.slow
def test_two_processes_write_each_prompt_once(tokenizer_export,
                                              car_export_dir, tmp_path):
  prompts = tmp_path / "prompts.txt"
  prompts.write_text("\n".join(f"prompt {i}" for i in range(10)) + "\n")
  out = tmp_path / "out"
  logs = run_processes(
      ["cvqcar.generate_benchmark", "--benchmark=dpg", f"--prompts={prompts}",
       f"--car={car_export_dir}", f"--tokenizer={tokenizer_export}",
       f"--out={out}", "--batch_size=8"], 2)
  assert sorted(os.listdir(out)) == [f"{i:05d}.png" for i in range(10)] + [
      "tokens"]
  assert all("wrote 5 prompts" in log for log in logs), logs
  # One process draws the samples that two did.
  from cvqcar.car import benchmark
  one = tmp_path / "one"
  benchmark.generate_benchmark("dpg", str(prompts), car_export_dir,
                               tokenizer_export, str(one), batch_size=8)
  for i in range(10):
    np.testing.assert_array_equal(np.load(out / "tokens" / f"{i:05d}.npy"),
                                  np.load(one / "tokens" / f"{i:05d}.npy"))


def test_exports_load_from_safetensors_alone(tokenizer_export,
                                             car_export_dir, tmp_path):
  import shutil

  from safetensors.numpy import load_file

  from cvqcar.car import export as car_export

  images = np.random.default_rng(0).uniform(-1, 1, (2, 16, 16, 3))
  want = export.load_tokenizer(tokenizer_export).encode(images)
  portable = tmp_path / "tok"
  shutil.copytree(tokenizer_export, portable)
  shutil.rmtree(portable / "params")  # no Orbax checkpoint left
  arrays = load_file(str(portable / "model.safetensors"))
  assert any(k.startswith("params/encoder/") for k in arrays)
  assert any(k.startswith("buffers/") for k in arrays)
  got = export.load_tokenizer(str(portable)).encode(images)
  np.testing.assert_array_equal(got, want)

  car = tmp_path / "car"
  shutil.copytree(car_export_dir, car)
  shutil.rmtree(car / "params")
  a, _ = car_export.load_car(car_export_dir)
  b, _ = car_export.load_car(str(car))
  for x, y in zip(jax.tree.leaves(nnx.state(a)),
                  jax.tree.leaves(nnx.state(b)),
                  strict=True):
    np.testing.assert_array_equal(x, y)
  assert any(k.startswith("backbone/") for k in
             load_file(str(car / "model.safetensors")))
