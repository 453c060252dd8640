"""Pre-tokenize pair shards with a frozen CVQ tokenizer.

Each image is resized (short side) and center-cropped to the tokenizer's
resolution, encoded to its C channel tokens and written with its caption as
{'tokens': int32 [C], 'caption'} records (format in cvqcar/data/pairs.py), so
CAR training skips the image decode and the tokenizer's encoder. Each
process encodes over all its local devices; shards are committed as they
fill, an interrupted run resumes and the input shards split over workers or
hosts (cvqcar/data/shard_writer.py). OUT/tokenizer_export.json records the
export's fingerprint; CAR training refuses the shards with another tokenizer
export.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import grain
import jax
import numpy as np
from absl import logging
from etils import epath
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from cvqcar.data import images as image_data
from cvqcar.data import pairs, shard_writer
from cvqcar.data import paths as paths_lib
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


def encode_rows(num_rows: int, num_devices: int) -> int:
  """An encoder batch of at least `num_rows` that the devices split evenly."""
  return max(1, -(-num_rows // num_devices)) * num_devices


class Encoder:
  """The tokenizer's encoder over a 1-D 'data' mesh of this process's
  devices: each call's images are zero-padded to `batch_size` rows (a
  multiple of the device count), so it compiles once."""

  def __init__(self, tokenizer, batch_size: int):
    devices = jax.local_devices()
    self.mesh = Mesh(np.array(devices), ("data",))
    self.batch_size = encode_rows(batch_size, len(devices))
    self.resolution = tokenizer.resolution
    graphdef, state = nnx.split(tokenizer)
    replicated = NamedSharding(self.mesh, P())
    self.state = jax.device_put(jax.device_get(state), replicated)
    self.rows = NamedSharding(self.mesh, P("data"))
    self._encode = jax.jit(
        lambda state, images: nnx.merge(graphdef, state).encode(images),
        in_shardings=(replicated, self.rows),
        out_shardings=replicated)

  def __call__(self, images: list[np.ndarray]) -> np.ndarray:
    """Tokens int32 [n, T] of n <= batch_size images [R, R, 3]."""
    r = self.resolution
    batch = np.zeros((self.batch_size, r, r, 3), np.float32)
    batch[:len(images)] = images
    batch = jax.device_put(batch, self.rows)
    return np.asarray(self._encode(self.state, batch))[:len(images)]


def tokenized_examples(encoder: Encoder, source, start: int, stop: int, *,
                       num_threads: int = 4) -> Iterator[dict[str, Any]]:
  """{'tokens' int32 [T], 'caption', 'key'} for each decodable record of
  source[start:stop], in order; a corrupt record i yields {'corrupt': i}."""
  ds = grain.MapDataset.source(source)[start:stop].map(
      _Prepare(encoder.resolution))
  ds = ds.to_iter_dataset(grain.ReadOptions(
      num_threads=num_threads, prefetch_buffer_size=2 * encoder.batch_size))
  batch = []

  def flush():
    tokens = encoder([e["image"] for e in batch])
    out = [{"tokens": row, "caption": e["caption"], "key": e["key"]}
           for e, row in zip(batch, tokens, strict=True)]
    batch.clear()
    return out

  for i, element in enumerate(ds, start):
    if element["corrupt"]:
      yield {"corrupt": i}
      continue
    batch.append(element)
    if len(batch) == encoder.batch_size:
      yield from flush()
  if batch:
    yield from flush()


def tokenize_shards(tokenizer_dir: str, input_spec: str, out: str, *,
                    batch_size: int = 64,
                    examples_per_shard: int | None = None,
                    num_threads: int = 4, worker_index: int = 0,
                    num_workers: int = 1) -> dict[str, int]:
  """Writes this worker's share of the pre-tokenized shards, resuming an
  interrupted run of the same arguments; returns its read/written/skipped
  counts.

  Input shard I's records [S * n, (S + 1) * n) (n = examples_per_shard)
  become OUT/pairs-IIIII-SSSSS.array_record (cvqcar.data.shard_writer), so a
  resumed run skips the ranges whose shard exists.
  """
  if batch_size < 1:
    raise ValueError(f"--batch_size must be at least 1, got {batch_size}")
  per_shard = examples_per_shard or pairs.DEFAULT_EXAMPLES_PER_SHARD
  paths = pairs.shard_paths(input_spec)
  units = shard_writer.worker_units(len(paths), worker_index, num_workers)
  if pairs.record_kind(pairs.read_source(input_spec)) != "image":
    raise ValueError("the input shards hold tokens already; expected image"
                     " shards (convert_pairs output)")
  rec = export.tokenizer_record(tokenizer_dir)
  output = shard_writer.Output(out, {
      "conversion": "tokenize_dataset", "tokenizer": rec, "inputs": paths,
      "examples_per_shard": per_shard})
  export.write_tokenizer_record(out, rec)  # pairs.check_shard_tokenizer
  tokenizer = export.load_tokenizer(tokenizer_dir)
  encoder = Encoder(tokenizer, batch_size)
  logging.info("worker %d of %d: tokenizing %d of %d input shards at %d px"
               " into %d tokens each, %d images per call on %d devices",
               worker_index, num_workers, len(units), len(paths),
               tokenizer.resolution, tokenizer.num_tokens,
               encoder.batch_size, encoder.mesh.size)
  stats = {"read": 0, "written": 0, "skipped": 0}
  named = []  # the first few corrupt records this run met
  start, fresh, done = time.time(), 0, 0
  for unit in units:
    counts = output.done(unit)
    if counts is None:
      source = grain.sources.ArrayRecordDataSource([paths[unit]])
      n = len(source)
      output.drop_temp(unit)
      written = 0
      for seq in range(-(-n // per_shard)):
        shard = paths_lib.join(out, shard_writer.shard_name(unit, seq))
        if epath.Path(shard).exists():  # committed by an earlier run
          written += shard_writer.num_records(shard)
          continue
        writer = shard_writer.UnitWriter(out, unit, seq, per_shard)
        for example in tokenized_examples(
            encoder, source, seq * per_shard,
            min(n, (seq + 1) * per_shard), num_threads=num_threads):
          if "corrupt" not in example:
            writer.write(example)
          elif len(named) < 3:  # the first few name the record
            named.append(f"{paths[unit]} record {example['corrupt']}")
            logging.warning("skipped %s: corrupt record", named[-1])
        writer.commit()
        written += writer.committed
        fresh += writer.committed
        logging.info("tokenized %d images, %.1f images/s; input shard %d/%d"
                     " of this worker", fresh,
                     fresh / max(time.time() - start, 1e-9), done + 1,
                     len(units))
      counts = {"input": paths[unit], "read": n, "written": written,
                "skipped": n - written}
      output.mark_done(unit, counts)
    done += 1
    for key in stats:
      stats[key] += counts[key]
  logging.info("finished worker %d of %d: %d input shards, %d written, %d"
               " corrupt records skipped%s", worker_index, num_workers,
               len(units), stats["written"], stats["skipped"],
               f" (first: {', '.join(named)})" if named else "")
  return stats
