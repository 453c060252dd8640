"""Grain image pipelines: ImageNet from TFDS, image folders, embedded photos,
Fashion-MNIST."""

from __future__ import annotations

import dataclasses
import importlib.resources
import io
import logging
import sys
from collections.abc import Iterator, Sequence
from typing import Any

import grain
import jax
import ml_collections
import numpy as np
from PIL import ExifTags, Image, ImageOps

from cvqcar.data import fashion, paths, tfds_images

# Photos bundled in the scikit-image wheel that stay out of training and give
# the embedded eval set (a cat, a coffee cup and a gravel texture).
EMBEDDED_EVAL_FILES = ("chelsea.png", "coffee.png", "gravel.png")
_EMBEDDED_SUFFIXES = (".png", ".jpg")


_HAS_ALPHA = ("RGBA", "LA", "PA", "RGBa", "La")


def to_rgb(pil: Image.Image) -> Image.Image:
  """An 8-bit RGB image of any PIL mode. 16-bit (and 32-bit integer) grey
  levels are scaled by 255 / 65535, float ones clipped to [0, 255];
  palette, grey, bilevel and CMYK images are converted; transparent pixels
  (an alpha band, or a palette / grey / RGB transparency key) are
  composited on white, as a viewer shows them on a white page."""
  if pil.mode in ("I", "F") or pil.mode.startswith("I;16"):
    array = np.asarray(pil).astype(np.float64)
    if pil.mode != "F":
      array = array / 257.0
    pil = Image.fromarray(np.clip(np.rint(array), 0, 255).astype(np.uint8))
  if pil.mode in _HAS_ALPHA or "transparency" in pil.info:
    rgba = pil.convert("RGBA")
    white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(white, rgba).convert("RGB")
  return pil if pil.mode == "RGB" else pil.convert("RGB")


def _orientation(pil: Image.Image) -> int:
  """The EXIF orientation tag (1: upright; 5 to 8 swap width and height)."""
  try:
    return int(pil.getexif().get(ExifTags.Base.Orientation, 1))
  except Exception:  # A malformed EXIF block keeps the stored pixels.  # noqa: BLE001
    return 1


def upright_size(pil: Image.Image) -> tuple[int, int]:
  """(width, height) as the image is shown: after its EXIF rotation."""
  w, h = pil.size
  return (h, w) if _orientation(pil) in (5, 6, 7, 8) else (w, h)


def _upright(pil: Image.Image) -> Image.Image:
  """`pil` turned as its EXIF orientation says (itself when upright)."""
  if _orientation(pil) in (2, 3, 4, 5, 6, 7, 8):
    return ImageOps.exif_transpose(pil)
  return pil


def _to_rgb(image: Image.Image) -> np.ndarray:
  return np.asarray(to_rgb(_upright(image)), dtype=np.uint8)


def embedded_photos(split: str) -> list[dict[str, Any]]:
  """scikit-image's bundled photographs as records {'image': uint8 [H, W, 3]}.

  'train' holds every photo but EMBEDDED_EVAL_FILES; 'eval' holds those.
  """
  if split not in ("train", "eval"):
    raise ValueError(f"embedded split must be 'train' or 'eval', got {split!r}")
  root = importlib.resources.files("skimage") / "data"
  names = sorted(p.name for p in root.iterdir()
                 if p.name.endswith(_EMBEDDED_SUFFIXES))
  names = [n for n in names if (n in EMBEDDED_EVAL_FILES) == (split == "eval")]
  records = []
  for name in names:
    with Image.open(io.BytesIO((root / name).read_bytes())) as image:
      records.append({"image": _to_rgb(image), "name": name})
  if not records:
    raise FileNotFoundError(f"no photos found under {root}")
  return records


def decode_image(image: Any) -> np.ndarray | None:
  """uint8 [H, W, 3] from encoded bytes or an array; None if undecodable.

  Encoded images are turned upright (EXIF orientation) and made RGB as
  `to_rgb` says: 16-bit scaled to 8, transparency composited on white.
  Arrays are [H, W] or [H, W, 1 | 3 | 4], uint8 or uint16 (scaled to 8
  bits); a fourth channel is alpha, composited on white.
  """
  if isinstance(image, (bytes, np.bytes_)):
    try:
      with Image.open(io.BytesIO(image)) as pil:
        return _to_rgb(pil)
    except Exception:  # PIL raises many types on corrupt data.  # noqa: BLE001
      return None
  array = np.asarray(image)
  if array.ndim == 2:
    array = array[..., None]
  if array.ndim != 3 or array.shape[-1] not in (1, 3, 4) or min(
      array.shape[:2]) == 0:
    return None
  if array.dtype == np.uint16:
    array = np.rint(array / 257.0)
  array = np.clip(array, 0, 255).astype(np.uint8)
  if array.shape[-1] == 4:
    return _to_rgb(Image.fromarray(array, "RGBA"))
  if array.shape[-1] == 1:
    array = np.repeat(array, 3, axis=-1)
  return array


@dataclasses.dataclass(frozen=True)
class Preprocess:
  """Record -> {'image': float32 [R, R, 3] in [-1, 1]} or {'corrupt': True}.

  crop: 'center' (resize short side to R, center crop), 'random' (resize
  short side to R, random crop) or 'random_scale' (square crop of a random
  side in [min_scale, 1] x short side, then resize to R: many natural-image
  patches from a few large photos). Only the crop is resized, so a very
  long, thin image never becomes a huge array. An image whose short side
  (upright, after its EXIF rotation) is under `min_size` pixels is dropped
  as corrupt, and counted. Pixels are decoded as `to_rgb` says
  (transparency on white).
  """

  resolution: int
  crop: str = "center"
  flip: bool = False
  min_scale: float = 0.15
  min_size: int = 0

  def __call__(self, record: dict[str, Any], rng: np.random.Generator):
    try:
      pil = _open(record["image"])
      if pil is None:
        return {"corrupt": True}
      size = upright_size(pil)
      if min(size) < max(1, self.min_size):
        return {"corrupt": True}
      image = np.asarray(_crop_resize(pil, self._box(size, rng),
                                      self.resolution))
    except Exception:  # PIL raises many types on corrupt data.  # noqa: BLE001
      return {"corrupt": True}
    if self.flip and rng.random() < 0.5:
      image = image[:, ::-1]
    return {"image": image.astype(np.float32) / 127.5 - 1.0, "corrupt": False}

  def _box(self, size: tuple[int, int], rng: np.random.Generator):
    """The crop, in source pixels (left, top, right, bottom), that becomes
    the R x R output. 'center' and 'random' take the R x R window of the
    image resized to a short side of R, without resizing the whole image."""
    r, (w, h) = self.resolution, size
    if self.crop == "random_scale":
      short = min(h, w)
      side = int(rng.uniform(max(self.min_scale * short, min(r, short)),
                             short + 1))
      top, left = rng.integers(0, h - side + 1), rng.integers(0, w - side + 1)
      return (left, top, left + side, top + side)
    scale = r / min(h, w)
    nh, nw = max(r, round(h * scale)), max(r, round(w * scale))
    if self.crop == "random":
      top, left = rng.integers(0, nh - r + 1), rng.integers(0, nw - r + 1)
    else:
      top, left = (nh - r) // 2, (nw - r) // 2
    sx, sy = w / nw, h / nh
    return (left * sx, top * sy, (left + r) * sx, (top + r) * sy)


def _open(image: Any) -> Image.Image | None:
  """A PIL image of encoded bytes (not decoded yet: `_crop_resize` may
  decode a JPEG at a reduced scale) or of an array; None if unreadable."""
  if isinstance(image, (bytes, np.bytes_)):
    return Image.open(io.BytesIO(image))
  array = decode_image(image)
  return None if array is None else Image.fromarray(array)


def _crop_resize(pil: Image.Image, box, size: int) -> Image.Image:
  """The `box` (in upright pixels: after the EXIF rotation) of `pil`
  resized to size x size (bicubic), in one resample. A JPEG whose box
  shrinks by 4x or more is decoded at 1/2, 1/4 or 1/8 scale (libjpeg's DCT
  scaling, PIL's draft mode), keeping at least twice the output's pixels
  for the bicubic step (as PIL's reducing_gap=2); the reduced image is then
  turned upright and the box scaled to it, axis by axis."""
  w, h = upright_size(pil)
  factor = (box[2] - box[0]) / size / 2
  if pil.format == "JPEG" and factor >= 2:
    pil.draft("RGB", (max(1, int(pil.width / factor)),
                      max(1, int(pil.height / factor))))
  image = to_rgb(_upright(pil))
  sx, sy = image.width / w, image.height / h
  box = (box[0] * sx, box[1] * sy, box[2] * sx, box[3] * sy)
  return image.resize((size, size), Image.Resampling.BICUBIC, box=box,
                      reducing_gap=2.0)


class _SkipCorruptIterator(grain.DatasetIterator):
  """Drops corrupt records; each kept element counts the drops before it."""

  def __next__(self):
    skipped = 0
    while True:
      element = next(self._parent)
      if not element.pop("corrupt"):
        element["skipped"] = np.int32(skipped)
        return element
      skipped += 1

  def get_state(self):
    return self._parent.get_state()

  def set_state(self, state):
    self._parent.set_state(state)


class SkipCorrupt(grain.IterDataset):
  """A Grain stage that drops elements flagged 'corrupt' and counts them.

  The count travels with the data (summed by batching) so it survives worker
  processes and is reported in the training metrics as data/skipped.
  """

  def __iter__(self):
    return _SkipCorruptIterator(self._parent.__iter__())


class EpochShuffle(grain.MapDataset):
  """The parent repeated forever, each epoch in its own order: element i is
  parent[perm(i // n)[i % n]], perm(e) a numpy permutation seeded by (seed,
  e), computed once an epoch. Grain's MapDataset.shuffle computes each
  index with a 4-round Feistel hash that costs ~0.4 ms a call on a CPU
  host, a fifth of the time a training image takes to decode and crop."""

  def __init__(self, parent: grain.MapDataset, *, seed: int):
    super().__init__(parent)
    self._seed, self._n = int(seed), len(parent)
    self._cache: tuple[int, np.ndarray] | None = None

  def __len__(self) -> int:
    return sys.maxsize

  def __str__(self) -> str:
    return f"EpochShuffle(seed={self._seed})"

  def _order(self, epoch: int) -> np.ndarray:
    cache = self._cache  # one read: threads may replace it meanwhile
    if cache is None or cache[0] != epoch:
      cache = (epoch, np.random.default_rng(
          [self._seed, epoch]).permutation(self._n))
      self._cache = cache
    return cache[1]

  def __getitem__(self, index):
    if isinstance(index, slice):
      return self.slice(index)
    epoch, i = divmod(index, self._n)
    return self._parent[int(self._order(epoch)[i])]

  def __getstate__(self):
    return {**self.__dict__, "_cache": None}


def records_pipeline(
    records: Sequence[Any],
    transform,
    *,
    batch_size: int,
    seed: int,
    train: bool,
    num_examples: int | None = None,
    num_threads: int = 4,
    worker_count: int = 0,
    drop_remainder: bool = True,
    start_example: int = 0,
    process_index: int | None = None,
    process_count: int | None = None,
) -> grain.IterDataset:
  """Shuffled/repeated (train) or one-pass (eval) batches of this process.

  `transform(record, rng)` returns an element dict with a 'corrupt' flag.
  `batch_size` is global; each JAX process yields batches of batch_size /
  process_count. `num_examples` takes the first num_examples records,
  cycling if there are fewer (eval crops from a few photos).

  Training reads one global stream, the same for any number of processes:
  example i is record shuffle(i) of the repeated records, transformed with
  a random generator seeded by (seed, i). Global batch t is examples
  [start_example + t * batch_size, ... + batch_size), and process p of P
  reads its contiguous block of batch_size / P of them. So a run that
  resumes at step s on another process count, with start_example = the
  examples consumed so far, sees exactly the examples an uninterrupted run
  would (elastic resume; corrupt records shift a process's own block by
  the number dropped). Eval splits the records one pass, p::P.
  """
  processes = jax.process_count() if process_count is None else process_count
  index = jax.process_index() if process_index is None else process_index
  if batch_size % processes:
    raise ValueError(f"batch size {batch_size} is not divisible by the"
                     f" {processes} JAX processes")
  local = batch_size // processes
  ds = grain.MapDataset.source(records)
  if num_examples is not None:
    n = len(records)
    ds = grain.MapDataset.range(num_examples).map(lambda i: records[i % n])
  if train:
    stream = EpochShuffle(ds, seed=seed).random_map(transform, seed=seed)

    def global_index(j: int) -> int:  # this process's j-th example
      return start_example + (j // local) * batch_size + index * local + (
          j % local)

    ds = grain.MapDataset.range(len(stream) - start_example).map(
        lambda j: stream[global_index(j)])
  else:
    # Seeded by the global index before the split: process p draws for
    # example i what one process would, never the draw of its own i-th.
    ds = ds.random_map(transform, seed=seed)[index::processes]
  ds = ds.to_iter_dataset(grain.ReadOptions(
      num_threads=num_threads, prefetch_buffer_size=2 * local))
  ds = SkipCorrupt(ds)
  ds = ds.batch(local, drop_remainder=drop_remainder)
  if worker_count > 0:
    ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=worker_count))
  return ds


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


class FolderImages(Sequence):
  """Records {'image': encoded bytes, 'name'} of the image files in a
  directory (sorted by name; local or an object store such as gs://),
  read when asked for."""

  def __init__(self, directory: str):
    if not paths.is_dir(directory):
      raise FileNotFoundError(f"image folder {directory!r} does not exist")
    self.directory = directory
    self.names = paths.list_files(directory, IMAGE_SUFFIXES)
    if not self.names:
      raise FileNotFoundError(f"no {'/'.join(IMAGE_SUFFIXES)} files in"
                              f" {directory}")

  def __len__(self) -> int:
    return len(self.names)

  def __getitem__(self, i):
    return {"image": paths.read_bytes(paths.join(self.directory,
                                                 self.names[i])),
            "name": self.names[i]}


def padded_eval_batches(records: Sequence[Any], preprocess, *,
                        batch_size: int, seed: int = 0,
                        num_examples: int | None = None,
                        num_threads: int = 4) -> Iterator[dict[str, Any]]:
  """One pass over every record, each counted exactly once.

  Yields this process's batches of batch_size / process_count rows with a
  'mask' (1 real, 0 padding): a short last batch is padded, never dropped,
  and every process yields the same number of batches (the collectives of a
  sharded eval step need that). The last batch also carries 'corrupt', this
  process's count of undecodable records.
  """
  n = len(records) if num_examples is None else num_examples
  ds = records_pipeline(records, preprocess, batch_size=batch_size,
                        seed=seed, train=False, num_examples=num_examples,
                        num_threads=num_threads, drop_remainder=False)
  r = preprocess.resolution
  return pad_batches(ds, {"image": np.zeros((0, r, r, 3), np.float32)}, n,
                     batch_size)


def pad_batches(ds, empty: dict[str, np.ndarray], num: int,
                batch_size: int) -> Iterator[dict[str, Any]]:
  """A one-pass eval pipeline (records_pipeline, train=False, no dropped
  remainder) over `num` examples as padded, masked batches of this
  process's batch_size / process_count rows: every process yields the same
  number of batches, a process whose share ended first yields `empty` (the
  batch's keys, zero rows) padded. The last batch carries 'corrupt'."""
  processes, index = jax.process_count(), jax.process_index()
  local = batch_size // processes
  share = len(range(index, num, processes))
  most = -(-num // processes)  # the largest process's share
  num_batches = max(1, -(-most // local))
  it, real = iter(ds), 0
  for i in range(num_batches):
    batch = next(it, None)
    if batch is None:  # this process's share ended before the others'
      batch = dict(empty)
    batch.pop("skipped", None)
    rows = len(next(iter(batch.values())))
    real += rows
    out = {k: np.concatenate([v, np.zeros((local - rows,) + v.shape[1:],
                                          v.dtype)])
           for k, v in batch.items()}
    out["mask"] = (np.arange(local) < rows).astype(np.float32)
    if i == num_batches - 1:
      out["corrupt"] = np.int64(share - real)
    yield out


def image_pipeline(records: Sequence[dict[str, Any]], *,
                   preprocess: Preprocess, **kwargs) -> grain.IterDataset:
  """Batches {'image' [b, R, R, 3] float32, 'skipped' [b]}; see
  records_pipeline for the keyword arguments."""
  return records_pipeline(records, preprocess, **kwargs)


def imagenet_records(cfg: ml_collections.ConfigDict, split: str):
  """TFDS cfg.tfds_name (default imagenet2012) `split` in cfg.data_dir as a
  random-access source of {'image': encoded bytes, 'label', ...}; nothing
  is downloaded. Data prepared as TFRecord raises an error naming the
  conversion command (cvqcar.data.tfds_images)."""
  if not cfg.data_dir:
    raise ValueError("config.data.data_dir must point at a local TFDS"
                     " directory holding imagenet2012 (nothing is downloaded)")
  return tfds_images.source(cfg.get("tfds_name") or "imagenet2012", split,
                            cfg.data_dir)


def _preprocess(d: ml_collections.ConfigDict, resolution: int,
                **kwargs) -> Preprocess:
  """Preprocess with config.data's minimum image size."""
  return Preprocess(resolution, min_size=d.get("min_image_size", 0),
                    **kwargs)


def train_dataset(config: ml_collections.ConfigDict,
                  start_example: int = 0) -> grain.IterDataset:
  """The tokenizer config's training images from global example
  `start_example` on (records_pipeline)."""
  d, r = config.data, config.model.resolution
  if d.name == "embedded":
    records = embedded_photos("train")
    preprocess = _preprocess(d, r, crop="random_scale", flip=True,
                             min_scale=d.min_scale)
  elif d.name == "imagenet2012":
    records = imagenet_records(d, d.train_split)
    preprocess = _preprocess(d, r, crop=d.train_crop, flip=True)
  elif d.name == "fashion_mnist":
    records = fashion.records(d.data_dir, "train")
    preprocess = _preprocess(d, r, crop="center")
  else:
    raise ValueError(f"config.data.name must be 'embedded', 'imagenet2012'"
                     f" or 'fashion_mnist',"
                     f" got {d.name!r}")
  logging.info("train data: %s, %d records", d.name, len(records))
  return image_pipeline(records, preprocess=preprocess,
                        batch_size=config.batch_size, seed=config.seed,
                        train=True, num_threads=d.num_threads,
                        worker_count=d.worker_count,
                        start_example=start_example)


def eval_records(config: ml_collections.ConfigDict):
  """(records, preprocess, number of images) of config.data's eval set."""
  d, r = config.data, config.model.resolution
  if d.name == "embedded":
    return (embedded_photos("eval"),
            _preprocess(d, r, crop="random_scale", min_scale=d.min_scale),
            d.num_eval_images)
  if d.name == "folder":
    records = FolderImages(d.eval_dir)
  elif d.name == "fashion_mnist":
    records = fashion.records(d.data_dir, "test")
  else:
    records = imagenet_records(d, d.eval_split)
  num = min(d.num_eval_images or len(records), len(records))
  return records, _preprocess(d, r, crop="center"), num


def eval_batches(config: ml_collections.ConfigDict):
  """The fixed eval set (the same images in the same order every time) as
  padded, masked batches: see padded_eval_batches."""
  records, preprocess, num = eval_records(config)
  return padded_eval_batches(
      records, preprocess, batch_size=config.eval_batch_size,
      seed=config.seed + 1, num_examples=num,
      num_threads=config.data.num_threads)


def eval_dataset(config: ml_collections.ConfigDict) -> grain.IterDataset:
  """A fixed eval set: the same images in the same order at every eval."""
  d, r = config.data, config.model.resolution
  if d.name == "embedded":
    records = embedded_photos("eval")
    preprocess = _preprocess(d, r, crop="random_scale", min_scale=d.min_scale)
    num = d.num_eval_images
  else:
    records = (fashion.records(d.data_dir, "test")
               if d.name == "fashion_mnist"
               else imagenet_records(d, d.eval_split))
    preprocess = _preprocess(d, r, crop="center")
    num = min(d.num_eval_images or len(records), len(records))
  return image_pipeline(records, preprocess=preprocess,
                        batch_size=config.eval_batch_size,
                        seed=config.seed + 1, train=False, num_examples=num,
                        num_threads=d.num_threads)

