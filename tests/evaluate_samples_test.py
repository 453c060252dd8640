"""evaluate_samples: FID, sFID, Inception Score and precision/recall of
generated images against torch-fidelity and pytorch-fid on the same random
Inception weights, every reference format, and one process against two."""

import json
import os
import warnings

import numpy as np
import pytest
import torch_references
from PIL import Image

from conftest import run_processes
from cvqcar.data import images as image_data
from cvqcar.evaluation import (
  classifier,
  fid,
  generative,
  image_sets,
  samples_job,
)

# Random classifier weights give near-uniform softmaxes (IS ~ 1.00): scaled
# up, the Inception Score has something to measure.
FC_SCALE = 40.0


@pytest.fixture(scope="module")
def network(tmp_path_factory, sets):
  """(weights file, torch model, fc weight) of one random Inception, its
  batch norms calibrated on both sets."""
  model, state = torch_references.fid_inception(
      calibrate_on=np.concatenate([sets["real"][1], sets["fake"][1]]))
  state = dict(state, **{"fc.weight": state["fc.weight"] * FC_SCALE})
  path = tmp_path_factory.mktemp("inception") / "inception.npz"
  np.savez(path, **state)
  return str(path), model, state["fc.weight"]


def _crops(photos, n, size, rng, shift=0):
  out = []
  for i in range(n):
    p = photos[(i + shift) % len(photos)]
    top = rng.integers(0, p.shape[0] - size)
    left = rng.integers(0, p.shape[1] - size)
    out.append(p[top:top + size, left:left + size])
  return np.stack(out)


@pytest.fixture(scope="module")
def sets(tmp_path_factory):
  """Two folders of 14 photo crops at 32 px: 'real' and 'fake' (other
  crops, darker and noisier), in nested class folders."""
  root = tmp_path_factory.mktemp("sets")
  rng = np.random.default_rng(0)
  photos = [r["image"] for r in image_data.embedded_photos("train")]
  real = _crops(photos, 14, 32, rng)
  fake = _crops(photos, 14, 32, rng, shift=3).astype(np.float32) * 0.7
  fake = np.clip(fake + rng.normal(0, 12, fake.shape), 0, 255).astype(np.uint8)
  for name, images in (("real", real), ("fake", fake)):
    for i, image in enumerate(images):
      os.makedirs(root / name / str(i % 2), exist_ok=True)
      Image.fromarray(image).save(root / name / str(i % 2) / f"{i:02d}.png")
  order = [f"{i % 2}/{i:02d}.png" for i in range(14)]
  order = sorted(range(14), key=lambda i: order[i])  # the folder's order
  return {"real": (str(root / "real"), real[order]),
          "fake": (str(root / "fake"), fake[order])}


def _torch_outputs(model, fc_weight, images):
  """pytorch-fid's network on uint8 images: pool, spatial (Mixed_6d's 1x1
  branch, first 7 channels, h w c order) and bias-free logits."""
  import torch

  seen = {}
  mixed_6d = model.blocks[2][6]  # Mixed_5b-d, 6a, 6b, 6c, 6d, 6e
  hook = mixed_6d.branch1x1.register_forward_hook(
      lambda m, i, o: seen.setdefault("spatial", o))
  try:
    with torch.no_grad():
      x = torch.as_tensor(images / 255.0, dtype=torch.float32)
      pool = model(x.permute(0, 3, 1, 2))[0][:, :, 0, 0].numpy()
  finally:
    hook.remove()
  spatial = seen["spatial"][:, :7].permute(0, 2, 3, 1).reshape(
      len(images), -1).numpy()
  return {"pool": pool, "spatial": spatial, "logits": pool @ fc_weight.T}


@pytest.fixture(scope="module")
def extracted(network, sets):
  net = generative.inception_network(network[0])
  return {name: generative.extract(image_sets.FolderSet(folder), net,
                                   batch_size=8, splits=2)
          for name, (folder, _) in sets.items()}


def test_scores_match_torch_fidelity_and_pytorch_fid(network, sets,
                                                     extracted):
  torch_references.pytorch_fid()
  fidelity_isc = pytest.importorskip("torch_fidelity.metric_isc")
  fidelity_prc = pytest.importorskip("torch_fidelity.metric_prc")
  import torch
  from pytorch_fid.fid_score import calculate_frechet_distance

  _, model, fc_weight = network
  want = {name: _torch_outputs(model, fc_weight, images)
          for name, (_, images) in sets.items()}
  fake, real = extracted["fake"], extracted["real"]
  assert fake.count == real.count == 14  # 2 batches of 8: one padded
  ref = generative.Reference.from_features(real, "real", {})
  got, skipped = samples_job.score(fake, ref, k=3)
  assert not skipped

  def frechet(kind):  # pytorch-fid's (sqrtm) on the pool features only:
    a, b = want["fake"][kind], want["real"][kind]  # 2023-d sqrtm is slow
    stats = (a.mean(0), np.cov(a, rowvar=False), b.mean(0),
             np.cov(b, rowvar=False))
    if kind == "spatial":
      return fid.frechet_distance(*stats)
    with warnings.catch_warnings():  # its scipy.sqrtm(disp=False)
      warnings.simplefilter("ignore", DeprecationWarning)
      return calculate_frechet_distance(*stats)

  for metric, kind in (("fid", "pool"), ("sfid", "spatial")):
    value = frechet(kind)
    assert value > 1.0, (metric, value)
    np.testing.assert_allclose(got[metric], value, rtol=1e-3, err_msg=metric)
  # torch-fidelity's defaults: shuffled with seed 2020, as ours.
  isc = fidelity_isc.isc_features_to_metric(
      torch.as_tensor(want["fake"]["logits"]), splits=2)
  assert isc["inception_score_mean"] > 1.2 and isc["inception_score_std"] > 0
  np.testing.assert_allclose(got["inception_score"],
                             isc["inception_score_mean"], rtol=1e-3)
  np.testing.assert_allclose(got["inception_score_std"],
                             isc["inception_score_std"], rtol=1e-2)
  precision, recall = fidelity_prc.calculate_precision_recall_full(
      torch.as_tensor(want["fake"]["pool"]),
      torch.as_tensor(want["real"]["pool"]), neighborhood=3)
  assert (got["precision"], got["recall"]) == pytest.approx(
      (precision, recall), abs=1e-9)
  assert 0 < precision < 1 or 0 < recall < 1, (precision, recall)


def test_precision_recall_and_inception_score_on_known_sets():
  rng = np.random.default_rng(0)
  real = rng.normal(size=(40, 16)).astype(np.float32)
  # Half the fakes sit on real points, half far away: precision 1/2; the
  # fakes' balls reach only the reals they copy, and those nearest them.
  fake = np.concatenate([real[:20] + 1e-3, real[:20] + 100]).astype(
      np.float32)
  precision, recall = generative.precision_recall(real, fake, k=3)
  assert precision == 0.5
  assert 0.5 <= recall < 1
  assert generative.precision_recall(real, real, k=3) == (1.0, 1.0)
  with pytest.raises(ValueError, match="more than 3 images"):
    generative.manifold_radii(real[:3], 3)
  # One-hot, confident predictions over 4 classes, uniform over the split:
  # IS = exp(log 4) = 4 in each split.
  p = np.eye(4)[np.arange(8) % 4] * (1 - 4e-9) + 1e-9
  sums = {"p": np.stack([p[:4].sum(0), p[4:].sum(0)]),
          "entropy": np.array([np.sum(p[:4] * np.log(p[:4]))] * 2),
          "n": np.array([4.0, 4.0])}
  mean, std = generative.inception_score(sums)
  assert mean == pytest.approx(4.0, rel=1e-6) and std < 1e-9
  with pytest.raises(ValueError, match="split is empty"):
    generative.inception_score(dict(sums, n=np.array([8.0, 0.0])))


def test_a_set_against_itself_and_every_reference_format(network, sets,
                                                         tmp_path):
  weights_path = network[0]
  real, fake = sets["real"][0], sets["fake"][0]
  run = lambda samples, ref, out, **kw: samples_job.evaluate_samples(
      samples, ref, str(tmp_path / out), weights_path, batch_size=8,
      splits=2, **kw)
  # --make_ref writes a folder's reference once; the folder against it:
  ref_path = str(tmp_path / "refs" / "real.npz")
  run(real, ref_path, "", make_ref=True)
  itself = run(real, ref_path, "self")
  assert abs(itself["fid"]) < 1e-6 and abs(itself["sfid"]) < 1e-6
  assert itself["recall"] == itself["precision"] == 1.0
  with open(tmp_path / "self" / "metrics.json") as f:
    assert json.load(f)["fid"] == itself["fid"]
  table = (tmp_path / "self" / "metrics.md").read_text()
  for words in ("| samples | images | FID | sFID | IS |", "bilinear to 299",
                "images: 14", f"reference: {ref_path} (14 images)"):
    assert words in table, words

  # Against the reference file (the folder against a folder is the parity
  # test's scoring, through the same score()).
  direct = run(fake, ref_path, "from_file")
  assert direct["fid"] > 1.0
  assert direct["reference_protocol"]["images"] == 14
  # pytorch-fid's statistics file (mu, sigma): FID only, the rest named.
  with np.load(ref_path) as f:
    fid.save_stats(str(tmp_path / "pytorch_fid.npz"), f["mu"], f["sigma"])
  stats_only = run(fake, str(tmp_path / "pytorch_fid.npz"), "stats_only")
  assert stats_only["fid"] == pytest.approx(direct["fid"], rel=1e-9)
  assert set(stats_only["skipped_metrics"]) == {"sfid", "precision",
                                                "recall"}
  assert "| n/a |" in (tmp_path / "stats_only" / "metrics.md").read_text()
  # ADM batches: samples in arr_0; a reference's own statistics (here the
  # fake set's) win over its images', which serve precision and recall.
  np.savez(tmp_path / "fake.npz", arr_0=sets["fake"][1])
  run(str(tmp_path / "fake.npz"), str(tmp_path / "fake_ref.npz"), "",
      make_ref=True)
  with np.load(tmp_path / "fake_ref.npz") as f:
    stats = {k: f[k] for k in ("mu", "sigma", "mu_s", "sigma_s")}
  np.savez(tmp_path / "adm_ref.npz", arr_0=sets["real"][1], **stats)
  adm = run(str(tmp_path / "fake.npz"), str(tmp_path / "adm_ref.npz"), "adm")
  assert abs(adm["fid"]) < 1e-6 and abs(adm["sfid"]) < 1e-6
  for key in ("precision", "recall", "inception_score"):
    assert adm[key] == pytest.approx(direct[key], rel=1e-6), key


def test_undecodable_and_odd_sized_images_are_counted(network, sets,
                                                      tmp_path):
  folder = tmp_path / "mixed"
  folder.mkdir()
  images = sets["real"][1]
  for i, image in enumerate(images[:6]):
    Image.fromarray(image).save(folder / f"{i}.png")
  Image.fromarray(np.zeros((40, 20, 3), np.uint8)).save(folder / "6.png")
  (folder / "7.png").write_bytes(b"\x89PNG not really")
  (folder / "notes.txt").write_text("not an image")
  net = generative.inception_network(network[0])
  features = generative.extract(image_sets.open_set(str(folder)), net,
                                batch_size=8, splits=2)
  assert features.count == 7 and features.skipped_corrupt == 1
  assert features.resized == 1 and features.image_size == (32, 32)


def test_npz_sets_stream_rows_in_any_order(tmp_path):
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (11, 5, 4, 3), dtype=np.uint8)
  np.savez_compressed(tmp_path / "c.npz", arr_0=images)
  np.savez(tmp_path / "grey.npz", arr_0=images[..., 0])
  for name in ("c.npz", "grey.npz"):
    npz = image_sets.NpzSet(str(tmp_path / name))
    assert len(npz) == 11
    want = images if name == "c.npz" else np.repeat(images[..., :1], 3, -1)
    for start, stop in ((3, 7), (7, 11), (0, 2), (9, 20)):
      got = npz.read(start, stop)
      np.testing.assert_array_equal(np.stack(got), want[start:stop])
  np.savez(tmp_path / "float.npz", arr_0=images.astype(np.float32))
  with pytest.raises(ValueError, match="float32 .* expected uint8"):
    image_sets.NpzSet(str(tmp_path / "float.npz"))
  np.savez(tmp_path / "stats.npz", mu=np.zeros(3))
  with pytest.raises(ValueError, match="has no 'arr_0'"):
    image_sets.NpzSet(str(tmp_path / "stats.npz"))
  with pytest.raises(ValueError, match="no image set"):
    image_sets.open_set(str(tmp_path / "missing"))


@pytest.mark.slow
def test_two_processes_give_the_numbers_of_one(sets, tmp_path):
  # The reading, gathering and reductions are the network's business of no
  # concern here: a small random classifier keeps the subprocesses quick.
  from flax import nnx

  path = classifier.save(
      classifier.Classifier(5, width=8, rngs=nnx.Rngs(0)),
      str(tmp_path / "clf"), resolution=32)
  ref = str(tmp_path / "real.npz")
  samples_job.evaluate_samples(sets["real"][0], ref, "",
                                    classifier_path=path, make_ref=True,
                                    batch_size=8)
  # 15 images, batch 8 over 2 processes: each reads 4 rows of a batch, the
  # second process's last rows padding, one file undecodable.
  folder = tmp_path / "fake"
  folder.mkdir()
  for i, image in enumerate(sets["fake"][1]):
    Image.fromarray(image).save(folder / f"{i:02d}.png")
  (folder / "99.png").write_bytes(b"not a png")

  def run(processes):
    out = tmp_path / f"p{processes}"
    run_processes(["cvqcar.evaluate_samples", f"--samples={folder}",
                   f"--ref={ref}", f"--out={out}", f"--classifier={path}",
                   "--batch_size=8", "--splits=2"], processes)
    with open(out / "metrics.json") as f:
      return json.load(f)

  one, two = run(1), run(2)
  assert one["images"] == two["images"] == 14
  assert one["skipped_corrupt"] == two["skipped_corrupt"] == 1
  for key in ("fid", "inception_score", "inception_score_std",
              "precision", "recall"):
    np.testing.assert_allclose(two[key], one[key], rtol=1e-6, atol=1e-6,
                               err_msg=key)
  assert one["fid"] > 1e-3


def test_a_classifier_as_the_feature_network(tmp_path, network):
  """A locally trained classifier's features and logits stand in for
  Inception's; labelled samples (arr_1) get its accuracy; a reference made
  with one network refuses the other."""
  rng = np.random.default_rng(0)
  labels = np.arange(24) % 3
  images = rng.integers(0, 80, (24, 12, 12, 3)).astype(np.uint8)
  images[..., 0] += (80 * labels).astype(np.uint8)[:, None, None]  # red
  x = images / 127.5 - 1
  model = classifier.train(x, labels, 3, steps=30, batch_size=24, width=8)
  path = classifier.save(model, str(tmp_path / "clf"), resolution=12,
                         test_accuracy=0.5)
  predicted = classifier.predict(model, x)
  samples_labels = predicted.copy()
  samples_labels[::3] = (predicted[::3] + 1) % 3  # a third wrong
  np.savez(tmp_path / "samples.npz", arr_0=images, arr_1=samples_labels)
  ref = str(tmp_path / "ref.npz")
  run = lambda samples, ref, **kw: samples_job.evaluate_samples(
      samples, ref, str(tmp_path / "out"), classifier_path=path,
      batch_size=8, splits=2, **kw)
  run(str(tmp_path / "samples.npz"), ref, make_ref=True)
  result = run(str(tmp_path / "samples.npz"), ref)
  assert abs(result["fid"]) < 1e-6 and result["recall"] == 1.0
  assert result["skipped_metrics"] == {
      "sfid": "the feature network has no spatial features"}
  assert result["classifier_accuracy"] == pytest.approx(2 / 3)
  assert "| accuracy |" in (tmp_path / "out" / "metrics.md").read_text()
  assert result["protocol"]["network"].startswith(f"the classifier at {path}")
  # An image set as the reference, its features computed on the spot: the
  # same numbers as the reference file of the same images.
  folder = tmp_path / "ref_images"
  folder.mkdir()
  for i, image in enumerate(images):
    Image.fromarray(image).save(folder / f"{i:02d}.png")
  on_the_spot = run(str(tmp_path / "samples.npz"), str(folder))
  for key in ("fid", "precision", "recall", "inception_score"):
    assert on_the_spot[key] == pytest.approx(result[key], rel=1e-6,
                                             abs=1e-9), key
  # FID in the classifier's feature space, against numpy on its features.
  feats = np.asarray(model.features(x), np.float64)
  half = generative.extract(image_sets.ArraySet(images[:12]),
                            classifier.feature_network(path), batch_size=8,
                            splits=2)
  np.testing.assert_allclose(half.pool_features, feats[:12], rtol=1e-5,
                             atol=1e-6)
  with pytest.raises(ValueError, match="made with the classifier"):
    samples_job.evaluate_samples(
        str(tmp_path / "samples.npz"), ref, str(tmp_path / "out2"),
        network[0], batch_size=8)
  with pytest.raises(ValueError, match="exactly one feature network"):
    samples_job.feature_network(network[0], path)


def test_a_tfds_split_is_an_image_set():
  tfds = pytest.importorskip("tensorflow_datasets")
  with tfds.testing.mock_data(num_examples=5,
                              policy=tfds.testing.MockPolicy.USE_CODE):
    images = image_sets.open_set("tfds:imagenet2012:validation",
                                 "/nonexistent")
    assert len(images) == 5
    rows = images.read(1, 4)
  assert len(rows) == 3
  assert all(r.dtype == np.uint8 and r.ndim == 3 and r.shape[-1] == 3
             for r in rows)
  assert np.std(rows[0]) > 1  # decoded pixels, not a fill
