"""Fashion-MNIST as images and as captioned pairs, read from local files.

The 70,000 28 x 28 grey clothing images of Fashion-MNIST (Xiao et al. 2017)
in ten classes. Nothing is downloaded: `data_dir` holds the four original
IDX files (train-images-idx3-ubyte.gz, ...), as Debian's
`dataset-fashion-mnist` package installs them under DEBIAN_DIR. Captions
name the class through a template; prompts built from HELD_OUT_TEMPLATE
are never seen in training, for a prompt-following score on new phrasing.
Selected with `config.data.name = 'fashion_mnist'` by the image and pair
pipelines.
"""

from __future__ import annotations

import gzip
import os
from typing import Any

import numpy as np

DEBIAN_DIR = "/usr/share/datasets/fashion-mnist"
CLASSES = ("T-shirt", "trouser", "pullover", "dress", "coat", "sandal",
           "shirt", "sneaker", "bag", "ankle boot")
# {} is the class with its article: "a sandal", "an ankle boot".
TRAIN_TEMPLATES = ("a photo of {}", "{}", "a grey picture of {}",
                   "{} on a black background")
HELD_OUT_TEMPLATE = "an image of {}"
_FILES = {"train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
          "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")}


def read_idx(path: str) -> np.ndarray:
  """An IDX file (optionally gzipped) of unsigned bytes as an array."""
  opener = gzip.open if path.endswith(".gz") else open
  with opener(path, "rb") as f:
    data = f.read()
  if len(data) < 4 or data[:2] != b"\0\0" or data[2] != 0x08:
    raise ValueError(f"{path} is not an IDX file of unsigned bytes")
  ndim = data[3]
  shape = tuple(int.from_bytes(data[4 + 4 * i:8 + 4 * i], "big")
                for i in range(ndim))
  body = np.frombuffer(data, np.uint8, offset=4 + 4 * ndim)
  if body.size != int(np.prod(shape)):
    raise ValueError(f"{path}: header says {shape}, found {body.size} bytes")
  return body.reshape(shape)


def load(data_dir: str, split: str) -> tuple[np.ndarray, np.ndarray]:
  """(images uint8 [N, 28, 28], labels int32 [N]) of 'train' (60,000) or
  'test' (10,000)."""
  if split not in _FILES:
    raise ValueError(f"Fashion-MNIST split must be 'train' or 'test', got"
                     f" {split!r}")
  data_dir = data_dir or DEBIAN_DIR
  paths = [os.path.join(data_dir, name) for name in _FILES[split]]
  missing = [p for p in paths if not os.path.exists(p)]
  if missing:
    raise FileNotFoundError(
        f"no Fashion-MNIST files in {data_dir!r} (missing"
        f" {os.path.basename(missing[0])}): install Debian's"
        " dataset-fashion-mnist package, or set config.data.data_dir to a"
        " directory holding the four IDX files")
  images, labels = (read_idx(p) for p in paths)
  if images.shape[0] != labels.shape[0] or images.shape[1:] != (28, 28):
    raise ValueError(f"{data_dir}: images {images.shape}, labels"
                     f" {labels.shape}")
  return images, labels.astype(np.int32)


def caption(label: int, template: str) -> str:
  name = CLASSES[label]
  return template.format(("an " if name[0] in "aeiou" else "a ") + name)


def records(data_dir: str, split: str, *, captions: bool = False,
            limit: int = 0) -> list[dict[str, Any]]:
  """Records {'image': uint8 [28, 28], 'label'} (+ 'caption', 'key' with
  `captions`): example i of 'train' takes TRAIN_TEMPLATES[i % 4], 'test'
  examples HELD_OUT_TEMPLATE. `limit` > 0 keeps the first examples."""
  images, labels = load(data_dir, split)
  if limit:
    images, labels = images[:limit], labels[:limit]
  out = []
  for i, (image, label) in enumerate(zip(images, labels, strict=True)):
    record = {"image": image, "label": int(label)}
    if captions:
      template = (TRAIN_TEMPLATES[i % len(TRAIN_TEMPLATES)]
                  if split == "train" else HELD_OUT_TEMPLATE)
      record.update(caption=caption(int(label), template),
                    key=f"{split}-{i}")
    out.append(record)
  return out
