"""Text-image pairs: ArrayRecord shards, the embedded captioned photos, Grain.

Record format: one ArrayRecord record per example, a msgpack map with
  'caption': str
and either
  'image': bytes   an encoded image (JPEG, PNG, WebP: anything PIL opens)
or, in pre-tokenized shards (tokenize_dataset),
  'tokens': bytes  CVQ channel tokens, little-endian int32 [C]
plus an optional 'key': str naming the source example. Shards are
OUT/*.array_record (write_shards: pairs-NNNNN-of-MMMMM; convert_pairs and
tokenize_dataset: pairs-IIIII-SSSSS, see cvqcar/data/shard_writer.py),
written with group_size:1 so that
Grain's random access reads one record, not a block. Pre-tokenized shards
have OUT/tokenizer_export.json beside them, naming the tokenizer export that
made them (cvqcar.fingerprint); config pipelines refuse another one.
"""

from __future__ import annotations

import dataclasses
import glob
import io
import logging
import os
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import grain
import ml_collections
import msgpack
import numpy as np
from array_record.python import array_record_module
from PIL import Image

from cvqcar import fingerprint
from cvqcar.data import fashion, paths, text
from cvqcar.data import images as image_data

SHARD_SUFFIX = ".array_record"
DEFAULT_EXAMPLES_PER_SHARD = 4096

# One truthful caption per photo scikit-image bundles
# (image_data.embedded_photos),
# at most 64 bytes to fit the tiny CAR config's max_text_len with 'bytes'.
# No caption says left or right, so horizontal flips keep them true.
EMBEDDED_CAPTIONS = {
    "astronaut.png": "a portrait of an astronaut in an orange spacesuit"
                     " by a flag",
    "brick.png": "a grayscale photo of a brick wall seen at an angle",
    "camera.png": "a black and white photo of a man filming with a tripod"
                  " camera",
    "cell.png": "a grayscale microscope image of a single round cell",
    "chelsea.png": "a ginger tabby cat",
    "chessboard_GRAY.png": "a checkerboard of black and white squares",
    "chessboard_RGB.png": "a black and white checkerboard pattern",
    "clock_motion.png": "a motion-blurred grayscale photo of a wall clock",
    "coffee.png": "a cup of coffee on a saucer",
    "coins.png": "a black and white photo of rows of ancient greek coins",
    "color.png": "a color wheel of every hue around a white center on black",
    "grass.png": "a grayscale close-up texture of grass",
    "gravel.png": "a grayscale texture of gravel stones",
    "horse.png": "a black silhouette of a horse on a white background",
    "hubble_deep_field.jpg": "the hubble deep field: many small galaxies"
                             " on black",
    "ihc.png": "a microscope image of tissue stained brown with blue nuclei",
    "logo.png": "the scikit-image logo: a green and orange disk with a snake",
    "microaneurysms.png": "a grayscale close-up of blood vessels on a retina",
    "moon.png": "a grayscale photo of the cratered surface of the moon",
    "motorcycle_left.png": "a red motorcycle parked in a garage with shelves"
                           " of boxes",
    "motorcycle_right.png": "a red motorcycle in a garage in front of"
                            " shelves of boxes",
    "page.png": "a photo of a printed page of text with a heading",
    "phantom.png": "a shepp-logan phantom: ellipses inside a white ellipse",
    "retina.jpg": "a color photo of a human retina with its red blood"
                  " vessels",
    "rocket.jpg": "a white rocket on its launch pad at dusk between tall"
                  " towers",
    "text.png": "a grayscale photo of handwritten math on a sheet of paper",
}


def serialize(example: dict[str, Any]) -> bytes:
  """{'caption', 'image' bytes | 'tokens' int [C], 'key'?} -> record bytes."""
  caption = example.get("caption")
  if not isinstance(caption, str):
    raise ValueError(f"example caption must be a str, got {caption!r}")
  record = {"caption": caption}
  if "key" in example:
    record["key"] = str(example["key"])
  if "tokens" in example:
    tokens = np.asarray(example["tokens"])
    if tokens.ndim != 1 or not np.issubdtype(tokens.dtype, np.integer):
      raise ValueError(f"example tokens must be integers [C], got"
                       f" {tokens.dtype} {tokens.shape}")
    record["tokens"] = tokens.astype("<i4").tobytes()
  elif isinstance(example.get("image"), (bytes, np.bytes_)):
    record["image"] = bytes(example["image"])
  else:
    raise ValueError("example needs 'image' (encoded bytes) or 'tokens',"
                     f" got keys {sorted(example)}")
  return msgpack.packb(record, use_bin_type=True)


def deserialize(raw: bytes) -> dict[str, Any]:
  """Record bytes -> {'caption', 'image' bytes | 'tokens' int32 [C]}."""
  try:
    record = msgpack.unpackb(raw, raw=False)
  except Exception as e:  # msgpack raises several types.  # noqa: BLE001
    raise ValueError(f"not a msgpack pair record: {e}") from e
  if not isinstance(record, dict) or not isinstance(
      record.get("caption"), str):
    raise ValueError("pair record must be a map with a str 'caption'")
  if "tokens" in record:
    record["tokens"] = np.frombuffer(record["tokens"], "<i4").astype(np.int32)
  elif not isinstance(record.get("image"), bytes):
    raise ValueError("pair record has neither 'image' bytes nor 'tokens'")
  return record


def encode_png(image: np.ndarray) -> bytes:
  buf = io.BytesIO()
  Image.fromarray(np.asarray(image, np.uint8)).save(buf, "PNG")
  return buf.getvalue()


def write_shards(examples: Iterable[dict[str, Any]], out_dir: str, *,
                 examples_per_shard: int | None = None,
                 num_shards: int | None = None) -> list[str]:
  """Writes examples (see `serialize`) as ArrayRecord shards; their paths.

  Give at most one of num_shards (examples dealt round-robin) and
  examples_per_shard (default DEFAULT_EXAMPLES_PER_SHARD, in order).
  """
  if examples_per_shard is not None and num_shards is not None:
    raise ValueError("give num_shards or examples_per_shard, not both")
  for name, value in (("num_shards", num_shards),
                      ("examples_per_shard", examples_per_shard)):
    if value is not None and value < 1:
      raise ValueError(f"{name} must be at least 1, got {value}")
  os.makedirs(out_dir, exist_ok=True)
  old = glob.glob(os.path.join(out_dir, "*" + SHARD_SUFFIX))
  if old:
    # Mixing with an earlier run's shards would silently change the image_data.
    raise FileExistsError(f"{out_dir} already holds {len(old)} shards; remove"
                          " them or choose another output directory")
  per_shard = examples_per_shard or DEFAULT_EXAMPLES_PER_SHARD
  temp = lambda i: os.path.join(out_dir, f"pairs-{i:05d}.tmp")
  writers, count = [], 0
  try:
    for example in examples:
      shard = count % num_shards if num_shards else count // per_shard
      while len(writers) <= shard:
        writers.append(array_record_module.ArrayRecordWriter(
            temp(len(writers)), "group_size:1"))
      writers[shard].write(serialize(example))
      count += 1
    while num_shards and len(writers) < num_shards:
      writers.append(array_record_module.ArrayRecordWriter(
          temp(len(writers)), "group_size:1"))
  finally:
    for w in writers:
      w.close()
  if not count:
    for i in range(len(writers)):
      os.remove(temp(i))
    raise ValueError(f"no examples to write to {out_dir}")
  paths = []
  for i in range(len(writers)):
    path = os.path.join(out_dir,
                        f"pairs-{i:05d}-of-{len(writers):05d}{SHARD_SUFFIX}")
    os.replace(temp(i), path)
    paths.append(path)
  logging.info("wrote %d examples in %d shards to %s", count, len(paths),
               out_dir)
  return paths


def shard_paths(pattern_or_dir: str) -> list[str]:
  """A directory's shards, or the files a glob (or comma list) matches;
  local or in an object store (gs://, s3://: data.paths)."""
  found = []
  for part in filter(None, pattern_or_dir.split(",")):
    if paths.is_dir(part):
      part = paths.join(part, "*" + SHARD_SUFFIX)
    found += paths.glob(part)
  if not found:
    raise FileNotFoundError(f"no {SHARD_SUFFIX} shards found at"
                            f" {pattern_or_dir!r} (a directory or a glob)")
  return found


def read_source(pattern_or_dir: str) -> grain.sources.ArrayRecordDataSource:
  """Random access to the serialized records of a shard set."""
  return grain.sources.ArrayRecordDataSource(shard_paths(pattern_or_dir))


def embedded_pairs(split: str) -> list[dict[str, Any]]:
  """The embedded photos with captions: {'image' uint8, 'caption', 'key'}.

  'train' and 'eval' split as image_data.embedded_photos does.
  """
  records = []
  for photo in image_data.embedded_photos(split):
    caption = EMBEDDED_CAPTIONS.get(photo["name"])
    if caption is None:
      # A newer scikit-image may ship more photos; they need a caption here.
      logging.warning("embedded photo %s has no caption; left out",
                      photo["name"])
      continue
    records.append({"image": photo["image"], "caption": caption,
                    "key": photo["name"]})
  return records


def _record(element: Any) -> dict[str, Any]:
  if isinstance(element, (bytes, np.bytes_)):
    return deserialize(bytes(element))
  return element


def first_record(source: Sequence[Any], tries: int = 100) -> dict[str, Any]:
  """The first record that parses; a corrupt one at the start is skipped."""
  if not len(source):
    raise ValueError("the pair source holds no records")
  error = None
  for i in range(min(len(source), tries)):
    try:
      return _record(source[i])
    except ValueError as e:
      error = e
  raise ValueError(f"none of the first {min(len(source), tries)} records is"
                   f" a pair record ({error}); expected convert_pairs or"
                   " tokenize_dataset output")


def record_kind(source: Sequence[Any]) -> str:
  """'image' or 'tokens', from the first record that parses."""
  return "tokens" if "tokens" in first_record(source) else "image"


@dataclasses.dataclass(frozen=True)
class PairPreprocess:
  """Record -> {'image' | 'tokens', 'text', 'text_mask'} or corrupt."""

  preprocess: image_data.Preprocess | None  # None: pre-tokenized records
  text_tokenizer: Any
  max_text_len: int
  truncate: bool = True
  num_tokens: int | None = None
  num_codes: int | None = None  # K: pre-tokenized ids must lie in 0..K-1

  def __call__(self, element: Any, rng: np.random.Generator):
    try:
      record = _record(element)
    except ValueError:
      return {"corrupt": True}
    ids, mask = text.encode_padded(self.text_tokenizer, record["caption"],
                                   self.max_text_len, truncate=self.truncate)
    if self.preprocess is None:
      tokens = record.get("tokens")
      if tokens is None:
        return {"corrupt": True}
      if self.num_tokens is not None and tokens.shape != (self.num_tokens,):
        raise ValueError(
            f"a record has {tokens.shape[0]} tokens, expected"
            f" {self.num_tokens}: shards from another tokenizer?")
      if self.num_codes is not None and tokens.size and not (
          0 <= tokens.min() and tokens.max() < self.num_codes):
        bad = tokens.min() if tokens.min() < 0 else tokens.max()
        raise ValueError(
            f"a record holds token id {bad}, outside 0..{self.num_codes - 1}"
            f" (K = {self.num_codes}): shards from another tokenizer?")
      out = {"tokens": tokens, "corrupt": False}
    else:
      if "image" not in record:
        return {"corrupt": True}
      out = self.preprocess(record, rng)
      if out["corrupt"]:
        return out
    out.update(text=ids, text_mask=mask)
    return out


def pair_pipeline(
    source: Sequence[Any],
    *,
    batch_size: int,
    seed: int,
    train: bool,
    text_tokenizer: text.TextTokenizer,
    max_text_len: int,
    resolution: int | None = None,
    truncate: bool = True,
    crop: str = "center",
    flip: bool = False,
    min_scale: float = 0.15,
    min_size: int = 0,
    num_tokens: int | None = None,
    num_codes: int | None = None,
    num_examples: int | None = None,
    num_threads: int = 4,
    worker_count: int = 0,
    start_example: int = 0,
) -> grain.IterDataset:
  """Batches {'image' [b, R, R, 3] float32 | 'tokens' [b, C] int32,
  'text' [b, L] int32, 'text_mask' [b, L] int32, 'skipped' [b] int32}.

  `source` holds serialized records (read_source) or record dicts
  (embedded_pairs). `batch_size` is global: each JAX process reads a
  disjoint 1/process_count share into batches of batch_size /
  process_count. Shuffled and repeated when `train`, else one pass;
  `num_examples` cycles through the first records (eval crops of a few
  photos). Corrupt records, and images whose short side is under
  `min_size`, are dropped and counted in 'skipped'.
  """
  kind = record_kind(source)
  if kind == "tokens":
    preprocess = None
    if num_tokens is None:
      num_tokens = len(first_record(source)["tokens"])
  else:
    if resolution is None:
      raise ValueError("image records need a resolution to crop to")
    preprocess = image_data.Preprocess(resolution, crop=crop, flip=flip,
                                       min_scale=min_scale, min_size=min_size)
  return image_data.records_pipeline(
      source, PairPreprocess(preprocess, text_tokenizer, max_text_len,
                             truncate, num_tokens, num_codes),
      batch_size=batch_size, seed=seed, train=train,
      num_examples=num_examples, num_threads=num_threads,
      worker_count=worker_count, start_example=start_example)


def check_shard_tokenizer(pattern: str, tokenizer_export: str,
                          allow: bool = False) -> None:
  """Refuses pre-tokenized shards made with another tokenizer export than
  `tokenizer_export` (their directory's tokenizer_export.json says)."""
  current = fingerprint.export_record(tokenizer_export)
  for directory in sorted({os.path.dirname(p) for p in shard_paths(pattern)}):
    fingerprint.check_record(directory, current, "the shard directory",
                             allow=allow, warn_if_missing=True)


class ClassPrompts(Sequence):
  """Labelled image records as pairs whose prompt is the class index (the
  'caption' "207" of class 207; data.text.ClassTokenizer reads it)."""

  def __init__(self, records: Sequence[dict[str, Any]]):
    self.records = records

  def __len__(self) -> int:
    return len(self.records)

  def __getitem__(self, i):
    record = self.records[i]
    return {**record, "caption": str(int(record["label"]))}


CLASS_SOURCES = ("fashion_mnist", "imagenet2012")


def _class_source(config: ml_collections.ConfigDict, split: str):
  """Class-conditional CAR's pairs: Fashion-MNIST (IDX files) or TFDS
  imagenet2012 (config.data.train_split / eval_split)."""
  d = config.data
  if d.name not in CLASS_SOURCES:
    raise ValueError(f"class-conditional CAR (config.num_classes="
                     f"{config.num_classes}) reads config.data.name in"
                     f" {CLASS_SOURCES}, got {d.name!r}")
  if d.get("pretokenized"):
    raise ValueError("config.data.pretokenized needs config.data.name="
                     "'shards'; class-conditional CAR reads labelled images")
  if d.name == "fashion_mnist":
    records = fashion.records(d.data_dir, "train" if split == "train" else
                              "test")
    want = len(fashion.CLASSES)
  else:
    records = image_data.imagenet_records(
        d, d.get("train_split", "train") if split == "train" else
        d.get("eval_split", "validation"))
    want = 1000
  if config.num_classes != want:
    raise ValueError(f"config.num_classes={config.num_classes}, but"
                     f" {d.name} has {want} classes")
  return ClassPrompts(records)


def _config_source(config: ml_collections.ConfigDict, split: str):
  d = config.data
  if config.get("num_classes", 0):
    return _class_source(config, split)
  if d.name == "embedded":
    if d.get("pretokenized"):
      raise ValueError("config.data.pretokenized needs config.data.name="
                       "'shards' (tokenize_dataset output)")
    return embedded_pairs(split)
  if d.name == "fashion_mnist":  # class-name captions, held-out phrasing
    return fashion.records(d.data_dir, "train" if split == "train" else
                           "test", captions=True)
  if d.name != "shards":
    raise ValueError(f"config.data.name must be 'embedded', 'shards' or"
                     f" 'fashion_mnist', got {d.name!r}")
  pattern = d.shards if split == "train" else (d.get("eval_shards")
                                               or d.shards)
  if not pattern:
    raise ValueError("config.data.shards must name a directory or glob of"
                     " pair shards (convert_pairs or tokenize_dataset output)")
  source = read_source(pattern)
  want = "tokens" if d.get("pretokenized") else "image"
  if record_kind(source) != want:
    raise ValueError(f"{pattern} holds {record_kind(source)} records but"
                     f" config.data.pretokenized={d.get('pretokenized')}"
                     f" expects {want} records")
  if want == "tokens":
    check_shard_tokenizer(pattern, config.get("tokenizer_export", ""),
                          config.get("allow_tokenizer_mismatch", False))
  return source


def _config_pipeline(config, text_tokenizer, split: str,
                     start_example: int = 0):
  d = config.data
  source = _config_source(config, split)
  embedded, train = d.name == "embedded", split == "train"
  num = None
  if not train:
    num = d.num_eval_examples
    if not embedded:
      num = min(num, len(source))  # the first records, one pass
  return pair_pipeline(
      source, batch_size=config.batch_size,
      seed=config.seed + (0 if train else 1), train=train,
      text_tokenizer=text_tokenizer, max_text_len=config.max_text_len,
      resolution=config.tokenizer.resolution,
      crop="random_scale" if embedded else d.get("crop", "center"),
      flip=embedded and train,
      min_scale=d.get("min_scale", image_data.Preprocess.min_scale),
      min_size=d.get("min_image_size", 0),
      num_tokens=config.tokenizer.latent_channels,
      num_codes=config.tokenizer.num_codes, num_examples=num,
      num_threads=d.get("num_threads", 4),
      worker_count=d.get("worker_count", 0) if train else 0,
      start_example=start_example)


def train_dataset(config: ml_collections.ConfigDict,
                  text_tokenizer: text.TextTokenizer,
                  start_example: int = 0) -> grain.IterDataset:
  """The CAR config's training pairs, shuffled and repeated, from global
  example `start_example` on (image_data.records_pipeline)."""
  return _config_pipeline(config, text_tokenizer, "train", start_example)


def eval_dataset(config: ml_collections.ConfigDict,
                 text_tokenizer: text.TextTokenizer) -> grain.IterDataset:
  """A fixed eval set: config.data.num_eval_examples pairs, same each time.

  For shards: config.data.eval_shards if set, else the first records of
  config.data.shards (then eval overlaps training).
  """
  return _config_pipeline(config, text_tokenizer, "eval")



def padded_eval_batches(config: ml_collections.ConfigDict,
                        text_tokenizer: text.TextTokenizer
                        ) -> Iterator[dict[str, Any]]:
  """eval_dataset's pairs, each exactly once, in padded batches.

  Batches of config.eval_batch_size (0 or unset: config.batch_size) global
  rows, this process's share of them, with a 'mask' (1 real, 0 padding):
  a short last batch is padded, never dropped, and every process yields
  the same number of batches (as image_data.padded_eval_batches, for
  image or token pairs). The last batch also carries 'corrupt', this
  process's count of undecodable records. Refuses an empty eval set.
  """
  d = config.data
  source = _config_source(config, "eval")
  num = d.num_eval_examples
  if d.name != "embedded":
    num = min(num, len(source))  # the first records, one pass
  if num < 1:
    raise ValueError(
        f"the eval set is empty: config.data.num_eval_examples="
        f"{d.num_eval_examples} and the eval source holds {len(source)}"
        " records; evaluation needs at least one example")
  batch_size = config.get("eval_batch_size") or config.batch_size
  kind = record_kind(source)
  r, c = config.tokenizer.resolution, config.tokenizer.latent_channels
  preprocess = None if kind == "tokens" else image_data.Preprocess(
      r, crop="random_scale" if d.name == "embedded" else d.get(
          "crop", "center"),
      min_scale=d.get("min_scale", image_data.Preprocess.min_scale))
  transform = PairPreprocess(
      preprocess, text_tokenizer, config.max_text_len,
      num_tokens=c if kind == "tokens" else None,
      num_codes=config.tokenizer.num_codes if kind == "tokens" else None)
  ds = image_data.records_pipeline(
      source, transform, batch_size=batch_size, seed=config.seed + 1,
      train=False, num_examples=num, num_threads=d.get("num_threads", 4),
      drop_remainder=False)
  zeros = {"text": np.zeros((0, config.max_text_len), np.int32),
           "text_mask": np.zeros((0, config.max_text_len), np.int32)}
  if kind == "tokens":
    zeros["tokens"] = np.zeros((0, c), np.int32)
  else:
    zeros["image"] = np.zeros((0, r, r, 3), np.float32)
  return image_data.pad_batches(ds, zeros, num, batch_size)
