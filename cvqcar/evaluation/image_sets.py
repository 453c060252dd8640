"""Sets of images to score, read in row ranges without loading them whole.

A set is named by one spec string:
  DIR                   every image file under DIR, recursively, sorted by
                        relative path (generate_benchmark's OUT/<class>/<n>.png)
  FILE.npz              an ADM-style batch: uint8 `arr_0` [N, H, W, 3]
                        (or [N, H, W] / [N, H, W, 1] grey), streamed from the
                        zip member, never loaded whole (50,000 images at
                        256 px are 9.8 GB)
  fashion_mnist:SPLIT   Fashion-MNIST's 'train' or 'test' images (local IDX
                        files, data_dir or Debian's dataset-fashion-mnist)
  tfds:NAME:SPLIT       a TFDS dataset's 'image' feature (data_dir; data
                        in the TFRecord format is refused naming its one-time
                        conversion, `python -m cvqcar.data.tfds_images`)

`read(start, stop)` returns the rows as uint8 [H, W, 3] arrays, None for
an image that cannot be decoded; `labels` is the rows' classes (an ADM
batch's arr_1, Fashion-MNIST's labels) or None. Rows are the unit the
scorer splits over processes, so every process opens the same set and
reads only its rows.
"""

from __future__ import annotations

import io
import os
import zipfile
from typing import Any

import numpy as np
from PIL import Image

from cvqcar.data import fashion, images, tfds_images

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp")


def to_rgb(image: Any) -> np.ndarray | None:
  """uint8 [H, W, 3] from encoded bytes or an array; None if it is not an
  image (undecodable bytes, wrong rank or channel count, zero size)."""
  if isinstance(image, (bytes, np.bytes_)):
    # As training decodes them: upright (EXIF), 16-bit scaled to 8,
    # transparency composited on white.
    return images.decode_image(image)
  array = np.asarray(image)
  if array.ndim == 2:
    array = array[..., None]
  if (array.ndim != 3 or array.shape[-1] not in (1, 3, 4)
      or min(array.shape[:2]) == 0 or array.dtype != np.uint8):
    return None
  if array.shape[-1] == 1:
    array = np.repeat(array, 3, axis=-1)
  return array[..., :3]


class FolderSet:
  """Every image file under a directory, recursively, by relative path."""

  labels = None

  def __init__(self, directory: str):
    if not os.path.isdir(directory):
      raise FileNotFoundError(f"image folder {directory!r} does not exist")
    self.directory = directory
    self.names = sorted(
        os.path.relpath(os.path.join(root, name), directory)
        for root, _, names in os.walk(directory) for name in names
        if name.lower().endswith(IMAGE_SUFFIXES))
    if not self.names:
      raise FileNotFoundError(f"no {'/'.join(IMAGE_SUFFIXES)} files under"
                              f" {directory}")

  def __len__(self) -> int:
    return len(self.names)

  def read(self, start: int, stop: int) -> list[np.ndarray | None]:
    out = []
    for name in self.names[start:stop]:
      with open(os.path.join(self.directory, name), "rb") as f:
        out.append(to_rgb(f.read()))
    return out


class NpzSet:
  """`key` of an .npz file, read row range by row range from its member.

  Rows are read forward through one open member (seeking forward only), so
  a pass over the set reads the file once, stored or compressed alike.
  """

  def __init__(self, path: str, key: str = "arr_0"):
    if not os.path.exists(path):
      raise FileNotFoundError(f"{path!r} does not exist")
    self.path, self.member = path, f"{key}.npy"
    self._zip = zipfile.ZipFile(path)
    if self.member not in self._zip.namelist():
      raise ValueError(f"{path} has no {key!r} (has"
                       f" {[n[:-4] for n in self._zip.namelist()]}); an ADM"
                       " batch holds its uint8 images [N, H, W, 3] in arr_0")
    self._file = self._zip.open(self.member)
    version = np.lib.format.read_magic(self._file)
    read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                   else np.lib.format.read_array_header_2_0)
    shape, fortran, dtype = read_header(self._file)
    if (dtype != np.uint8 or fortran or len(shape) not in (3, 4)
        or (len(shape) == 4 and shape[-1] not in (1, 3))):
      raise ValueError(f"{path}: {key} is {dtype} {shape}; expected uint8"
                       " images [N, H, W, 3] (or grey [N, H, W])")
    self.shape = tuple(shape)
    self.labels = None
    if "arr_1.npy" in self._zip.namelist():
      with self._zip.open("arr_1.npy") as f:
        labels = np.lib.format.read_array(f)
      if labels.shape == (shape[0],) and labels.dtype.kind in "iu":
        self.labels = labels.astype(np.int64)
    self._row_bytes = int(np.prod(shape[1:]))
    self._start = self._file.tell()
    self._row = 0

  def __len__(self) -> int:
    return self.shape[0]

  def read(self, start: int, stop: int) -> list[np.ndarray | None]:
    stop = min(stop, len(self))
    if start < self._row:  # backwards: open the member again
      self._file.close()
      self._file = self._zip.open(self.member)
      self._file.seek(self._start)
      self._row = 0
    if start > self._row:
      self._file.seek((start - self._row) * self._row_bytes, io.SEEK_CUR)
    data = self._file.read((stop - start) * self._row_bytes)
    if len(data) != (stop - start) * self._row_bytes:
      raise ValueError(f"{self.path} ends before row {stop} of"
                       f" {len(self)}: truncated file?")
    self._row = stop
    rows = np.frombuffer(data, np.uint8).reshape((stop - start,) +
                                                 self.shape[1:])
    return [to_rgb(row) for row in rows]


class ArraySet:
  """Images already in memory (uint8 [N, H, W] or [N, H, W, C]), and
  optionally their labels [N]."""

  def __init__(self, images: np.ndarray, labels: np.ndarray | None = None):
    self.images, self.labels = images, labels

  def __len__(self) -> int:
    return len(self.images)

  def read(self, start: int, stop: int) -> list[np.ndarray | None]:
    return [to_rgb(x) for x in self.images[start:stop]]


class TfdsSet:
  """The 'image' feature of a local TFDS split, random access."""

  labels = None

  def __init__(self, name: str, split: str, data_dir: str):
    # Either format: a TFRecord-only dataset raises naming the conversion.
    self.source = tfds_images.source(name, split, data_dir)

  def __len__(self) -> int:
    return len(self.source)

  def read(self, start: int, stop: int) -> list[np.ndarray | None]:
    return [to_rgb(self.source[i]["image"])
            for i in range(start, min(stop, len(self)))]


def open_set(spec: str, data_dir: str = ""):
  """The image set a spec names (see the module docstring)."""
  kind, _, rest = spec.partition(":")
  if kind == "fashion_mnist" and rest:
    images, labels = fashion.load(data_dir, rest)
    return ArraySet(images, labels.astype(np.int64))
  if kind == "tfds" and rest.count(":") == 1:
    name, split = rest.split(":")
    return TfdsSet(name, split, data_dir)
  if spec.endswith(".npz"):
    return NpzSet(spec)
  if os.path.isdir(spec):
    return FolderSet(spec)
  raise ValueError(f"{spec!r} is no image set: expected a directory of"
                   " images, an .npz batch (arr_0), 'fashion_mnist:SPLIT' or"
                   " 'tfds:NAME:SPLIT'")


def fit(image: np.ndarray, size: tuple[int, int]) -> tuple[np.ndarray, bool]:
  """(image at size (h, w), whether it had to be resized): bicubic, as
  PIL resizes."""
  if image.shape[:2] == size:
    return image, False
  resized = Image.fromarray(image).resize((size[1], size[0]),
                                          Image.Resampling.BICUBIC)
  return np.asarray(resized), True
