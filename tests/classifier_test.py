"""The prompt-following classifier learns shapes, and saves and loads."""

import numpy as np
import pytest

from cvqcar.data import fashion
from cvqcar.evaluation import classifier


def shapes(n: int, seed: int):
  """16 x 16 images of a bar (horizontal, vertical) or a square outline at
  a random place on noise: labels 0, 1, 2."""
  rng = np.random.default_rng(seed)
  images = rng.normal(-0.5, 0.2, (n, 16, 16, 3)).astype(np.float32)
  labels = rng.integers(0, 3, n)
  for image, label in zip(images, labels, strict=True):
    y, x = rng.integers(2, 9, 2)
    if label == 0:
      image[y, x:x + 7] = 1.0
    elif label == 1:
      image[y:y + 7, x] = 1.0
    else:
      image[y:y + 6, x] = image[y:y + 6, x + 5] = 1.0
      image[y, x:x + 6] = image[y + 5, x:x + 6] = 1.0
  return images, labels


def test_learns_shapes_and_round_trips(tmp_path):
  images, labels = shapes(1024, 0)
  model = classifier.train(images, labels, 3, steps=150, batch_size=64,
                           width=16)
  test_images, test_labels = shapes(300, 1)
  assert classifier.accuracy(model, test_images, test_labels) > 0.9
  # Labels shuffled: nothing to learn, held-out accuracy near chance.
  shuffled = classifier.train(images, np.random.default_rng(2).permutation(
      labels), 3, steps=150, batch_size=64, width=16)
  assert classifier.accuracy(shuffled, test_images, test_labels) < 0.55
  path = classifier.save(model, str(tmp_path / "clf"), classes=["a", "b"])
  loaded, config = classifier.load(path)
  np.testing.assert_array_equal(classifier.predict(loaded, test_images),
                                classifier.predict(model, test_images))
  assert list(config.info.classes) == ["a", "b"]
  with pytest.raises(ValueError, match="labels span"):
    classifier.train(images, labels + 1, 3, steps=1)


def test_fashion_idx_files_are_read_and_captioned(tmp_path):
  """IDX files written here in the original format (no download)."""
  import gzip

  rng = np.random.default_rng(0)
  for split, n in (("train", 6), ("t10k", 3)):
    images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
    labels = np.arange(n, dtype=np.uint8) % 10
    header = lambda dims: (bytes([0, 0, 8, len(dims)]) + b"".join(
        d.to_bytes(4, "big") for d in dims))
    with gzip.open(tmp_path / f"{split}-images-idx3-ubyte.gz", "wb") as f:
      f.write(header(images.shape) + images.tobytes())
    with gzip.open(tmp_path / f"{split}-labels-idx1-ubyte.gz", "wb") as f:
      f.write(header(labels.shape) + labels.tobytes())
  got, labels = fashion.load(str(tmp_path), "train")
  assert got.shape == (6, 28, 28) and labels.tolist() == list(range(6))
  records = fashion.records(str(tmp_path), "train", captions=True)
  assert [r["caption"] for r in records[:2]] == ["a photo of a T-shirt",
                                                 "a trouser"]
  held_out = fashion.records(str(tmp_path), "test", captions=True)
  assert held_out[0]["caption"] == "an image of a T-shirt"
  assert all(r["caption"].startswith("an image of") for r in held_out)
  with pytest.raises(FileNotFoundError, match="dataset-fashion-mnist"):
    fashion.load(str(tmp_path / "nowhere"), "train")
