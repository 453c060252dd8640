"""Pre-tokenize pair shards with a frozen CVQ tokenizer.

Each image is resized (short side) and center-cropped to the tokenizer's
resolution, encoded to its C channel tokens and written with its caption as
{'tokens': int32 [C], 'caption'} records (format in cvqcar/data/pairs.py), so
CAR training skips the image decode and the tokenizer's encoder. Runs in one
process on the default device. OUT/tokenizer_export.json records the export's
fingerprint; CAR training refuses the shards with another tokenizer export.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import grain
import jax
import numpy as np
from absl import logging
from flax import nnx

from cvqcar.data import images as image_data
from cvqcar.data import pairs
from cvqcar.tokenizer import export


class _Prepare:
  """Record bytes -> {'image', 'caption', 'key'} or {'corrupt': True}."""

  def __init__(self, resolution: int):
    self.preprocess = image_data.Preprocess(resolution, crop="center")

  def __call__(self, raw: Any) -> dict[str, Any]:
    try:
      record = pairs.deserialize(bytes(raw))
    except ValueError:
      return {"corrupt": True}
    if "image" not in record:
      return {"corrupt": True}
    out = self.preprocess(record, None)  # center crop: no randomness
    if not out["corrupt"]:
      out.update(caption=record["caption"], key=record.get("key", ""))
    return out


def _batches(ds, batch_size: int) -> Iterator[list[dict[str, Any]]]:
  batch = []
  for element in ds:
    batch.append(element)
    if len(batch) == batch_size:
      yield batch
      batch = []
  if batch:
    yield batch


def tokenized_examples(tokenizer, source, *, batch_size: int = 64,
                       num_threads: int = 4, stats: dict[str, int] | None = None
                       ) -> Iterator[dict[str, Any]]:
  """{'tokens' int32 [T], 'caption', 'key'} for each decodable record."""
  if pairs.record_kind(source) != "image":
    raise ValueError("the input shards hold tokens already; expected image"
                     " shards (convert_pairs output)")
  stats = {} if stats is None else stats
  stats.update(read=0, skipped=0, written=0)
  graphdef, state = nnx.split(tokenizer)
  encode = jax.jit(lambda state, images: nnx.merge(graphdef, state).encode(
      images))
  ds = grain.MapDataset.source(source).map(_Prepare(tokenizer.resolution))
  ds = image_data.SkipCorrupt(ds.to_iter_dataset(grain.ReadOptions(
      num_threads=num_threads, prefetch_buffer_size=2 * batch_size)))
  start, r = time.time(), tokenizer.resolution
  for step, batch in enumerate(_batches(ds, batch_size)):
    images = np.zeros((batch_size, r, r, 3), np.float32)
    images[:len(batch)] = [e["image"] for e in batch]
    # The last batch is zero-padded so the encoder compiles once.
    tokens = np.asarray(encode(state, images))[:len(batch)]
    for element, row in zip(batch, tokens, strict=True):
      stats["skipped"] += int(element["skipped"])
      stats["written"] += 1
      yield {"tokens": row, "caption": element["caption"],
             "key": element["key"]}
    if step % 50 == 0:
      logging.info("tokenized %d images (%d skipped), %.1f images/s",
                   stats["written"], stats["skipped"],
                   stats["written"] / max(time.time() - start, 1e-9))
  # Corrupt records after the last good one never reach a batch's count.
  stats.update(read=len(source), skipped=len(source) - stats["written"])


def tokenize_shards(tokenizer_dir: str, input_spec: str, out: str, *,
                    batch_size: int = 64,
                    examples_per_shard: int | None = None,
                    num_threads: int = 4) -> dict[str, int]:
  """Writes the pre-tokenized shards; returns read/written/skipped counts."""
  if batch_size < 1:
    raise ValueError(f"--batch_size must be at least 1, got {batch_size}")
  tokenizer = export.load_tokenizer(tokenizer_dir)
  rec = export.tokenizer_record(tokenizer_dir)
  source = pairs.read_source(input_spec)
  logging.info("tokenizing %d records at %d px into %d tokens each",
               len(source), tokenizer.resolution, tokenizer.num_tokens)
  stats: dict[str, int] = {}
  pairs.write_shards(
      tokenized_examples(tokenizer, source, batch_size=batch_size,
                         num_threads=num_threads, stats=stats),
      out, examples_per_shard=examples_per_shard)
  # After the shards: write_shards refuses a directory holding some.
  export.write_tokenizer_record(out, rec)
  logging.info("finished: %d written, %d corrupt records skipped",
               stats["written"], stats["skipped"])
  return stats
