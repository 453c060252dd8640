"""Convert webdataset tars or parquet files to ArrayRecord pair shards.

webdataset: members KEY.jpg|jpeg|png|webp and KEY.txt sharing a KEY make
one example. parquet: an image column of raw bytes or of structs with a
'bytes' field (as HF datasets write it) and a str caption column. Examples
whose image does not open or whose caption is empty are skipped and counted
by reason, as are non-string captions and input files that cannot be read
to their end (a truncated tar keeps the examples before the damage).
Output is written as it goes, resumes and splits over workers as
cvqcar/data/shard_writer.py describes. The record format is described in
cvqcar/data/pairs.py.
"""

from __future__ import annotations

import collections
import dataclasses
import io
import os
import re
import tarfile
import time
import zlib
from collections.abc import Iterator
from typing import Any

from absl import logging
from etils import epath
from PIL import Image

from cvqcar.data import pairs, shard_writer
from cvqcar.data import paths as paths_lib

FORMATS = ("webdataset", "parquet", "embedded")
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
_EXTENSIONS = {"webdataset": (".tar",), "parquet": (".parquet",)}
_NAMED = 3  # skipped examples named in the log, per reason


@dataclasses.dataclass
class Stats:
  """Running counts, logged as progress and returned at the end."""

  read: int = 0
  written: int = 0
  skipped: collections.Counter = dataclasses.field(
      default_factory=collections.Counter)
  # The first few examples (or input files) skipped for each reason.
  where: dict[str, list[str]] = dataclasses.field(default_factory=dict)
  inputs_done: int = 0
  inputs: int = 0  # this worker's share
  fresh: int = 0  # written by this run (not found done by a resumed one)
  start: float = dataclasses.field(default_factory=time.time)
  log_every: int = 1000

  def skip(self, reason: str, where: str) -> None:
    self.skipped[reason] += 1
    if self.skipped[reason] <= _NAMED:
      logging.warning("skipped %s: %s", where, reason)
      self.where.setdefault(reason, []).append(where)

  def wrote(self, fresh: bool = True) -> None:
    self.written += 1
    self.fresh += fresh
    if self.written % self.log_every == 0:
      logging.info("%s", self.summary())

  def counts(self) -> dict[str, Any]:
    return {"read": self.read, "written": self.written,
            "skipped": dict(self.skipped), "where": self.where}

  def add(self, counts: dict[str, Any]) -> None:
    """Adds an input's counts (Stats.counts of the run that converted it)."""
    self.read += counts["read"]
    self.written += counts["written"]
    self.skipped.update(counts["skipped"])
    for reason, where in counts["where"].items():
      named = self.where.setdefault(reason, [])
      named += where[:_NAMED - len(named)]

  def since(self, before: dict[str, Any]) -> dict[str, Any]:
    """The counts added since `before` (an earlier Stats.counts)."""
    return {"read": self.read - before["read"],
            "written": self.written - before["written"],
            "skipped": dict(self.skipped - collections.Counter(
                before["skipped"])),
            "where": {r: w[len(before["where"].get(r, [])):]
                      for r, w in self.where.items()
                      if len(w) > len(before["where"].get(r, []))}}

  def summary(self) -> str:
    skipped = ", ".join(f"{n} {r}" for r, n in self.skipped.most_common())
    seconds = time.time() - self.start
    return (f"{self.inputs_done}/{self.inputs} inputs, read {self.read},"
            f" wrote {self.written}, skipped {sum(self.skipped.values())}"
            f"{f' ({skipped})' if skipped else ''} in {seconds:.0f}s"
            f" ({self.fresh / max(seconds, 1e-9):.1f} examples/s written"
            " by this run)")

  def skipped_examples(self) -> str:
    """The first few skipped examples of each reason, for the final log."""
    return "; ".join(f"{reason}: {', '.join(where)}"
                     for reason, where in sorted(self.where.items()))


def expand_inputs(spec: str, fmt: str) -> list[str]:
  """Files a comma list of paths, globs or directories names, sorted."""
  paths = []
  for part in filter(None, spec.split(",")):
    if paths_lib.is_dir(part):  # local or gs://
      paths += [paths_lib.join(part, f)
                for f in paths_lib.list_files(part, _EXTENSIONS[fmt])]
    else:
      for pattern in _brace_to_globs(part):
        paths += paths_lib.glob(pattern)
  if not paths:
    raise FileNotFoundError(f"--input={spec!r} matches no {fmt} files")
  return paths


def _brace_to_globs(pattern: str) -> list[str]:
  """Expands webdataset's {00000..00009} ranges, which glob lacks."""
  m = re.search(r"\{(\d+)\.\.(\d+)\}", pattern)
  if not m:
    return [pattern]
  lo, hi = m.group(1), m.group(2)
  out = []
  for i in range(int(lo), int(hi) + 1):
    out += _brace_to_globs(pattern[:m.start()] + str(i).zfill(len(lo))
                           + pattern[m.end():])
  return out


def _check_image(image: bytes) -> str | None:
  """None if PIL can open the bytes as an image, else the reason."""
  try:
    with Image.open(io.BytesIO(image)) as pil:
      pil.verify()  # Parses the file structure without decoding pixels.
  except Exception:  # PIL raises many types.  # noqa: BLE001
    return "image does not open"
  return None


def _example(key: str, image: Any, caption: Any, where: str,
             stats: Stats) -> dict[str, Any] | None:
  stats.read += 1
  if image is None:
    stats.skip("no image", where)
    return None
  if isinstance(caption, bytes):
    try:
      caption = caption.decode("utf-8")
    except UnicodeDecodeError:
      stats.skip("caption is not UTF-8", where)
      return None
  if caption is not None and not isinstance(caption, str):
    stats.skip("caption is not a string", where)
    return None
  caption = (caption or "").strip()
  if not caption:
    stats.skip("no caption", where)
    return None
  reason = _check_image(image)
  if reason:
    stats.skip(reason, where)
    return None
  return {"image": image, "caption": caption, "key": key}


def webdataset_examples(path: str, stats: Stats) -> Iterator[dict[str, Any]]:
  """Examples of one webdataset tar; streams when keys come in order."""
  pending: dict[str, dict[str, bytes]] = {}
  with epath.Path(path).open("rb") as f, tarfile.open(fileobj=f) as tar:
    for member in tar:
      if not member.isfile():
        continue
      # webdataset: the key is the path up to the first dot of the name.
      folder, name = os.path.split(member.name)
      stem, _, ext = name.partition(".")
      ext = ext.lower()
      if ext != "txt" and ext not in IMAGE_EXTENSIONS:
        continue
      key = os.path.join(folder, stem)
      parts = pending.setdefault(key, {})
      parts["caption" if ext == "txt" else "image"] = tar.extractfile(
          member).read()
      if len(parts) == 2:
        del pending[key]
        example = _example(key, parts["image"], parts["caption"],
                           f"{path}:{key}", stats)
        if example:
          yield example
  for key, parts in pending.items():
    _example(key, parts.get("image"), parts.get("caption"), f"{path}:{key}",
             stats)


def _image_bytes(value: Any) -> bytes | None:
  if isinstance(value, dict):  # HF datasets: {'bytes': ..., 'path': ...}
    value = value.get("bytes")
  return value


def parquet_examples(path: str, stats: Stats, *, image_column: str,
                     caption_column: str,
                     batch_rows: int = 256) -> Iterator[dict[str, Any]]:
  """Examples of one parquet file, read a few hundred rows at a time."""
  import pyarrow.parquet as pq  # noqa: PLC0415 (only parquet needs it)

  with epath.Path(path).open("rb") as f:
    yield from _parquet_rows(pq.ParquetFile(f), path, stats,
                             image_column=image_column,
                             caption_column=caption_column,
                             batch_rows=batch_rows)


def _parquet_rows(file, path: str, stats: Stats, *, image_column: str,
                  caption_column: str,
                  batch_rows: int) -> Iterator[dict[str, Any]]:
  import pyarrow as pa  # noqa: PLC0415 (only parquet conversion needs it)

  schema = file.schema_arrow
  for column in (image_column, caption_column):
    if column not in schema.names:
      raise ValueError(f"{path} has no column {column!r}; its columns are"
                       f" {schema.names} (set --image_column/--caption_column)")
  image_type = schema.field(image_column).type
  if pa.types.is_struct(image_type):
    fields = [image_type.field(i).name for i in range(image_type.num_fields)]
    if "bytes" not in fields:
      raise ValueError(f"{path}: column {image_column!r} is a struct with"
                       f" fields {fields}, expected a 'bytes' field")
  elif not (pa.types.is_binary(image_type)
            or pa.types.is_large_binary(image_type)):
    raise ValueError(f"{path}: column {image_column!r} has type {image_type},"
                     " expected binary image bytes or struct<bytes: binary>")
  row = 0
  for batch in file.iter_batches(batch_size=batch_rows,
                                 columns=[image_column, caption_column]):
    images = batch.column(image_column).to_pylist()
    captions = batch.column(caption_column).to_pylist()
    for image, caption in zip(images, captions, strict=True):
      key = f"{os.path.basename(path)}:{row}"
      example = _example(key, _image_bytes(image), caption,
                         f"{path} row {row}", stats)
      row += 1
      if example:
        yield example


def embedded_examples(stats: Stats) -> Iterator[dict[str, Any]]:
  """The embedded captioned photos (both splits), as PNG bytes."""
  for split in ("train", "eval"):
    for record in pairs.embedded_pairs(split):
      stats.read += 1
      yield {"image": pairs.encode_png(record["image"]),
             "caption": record["caption"], "key": record["key"]}


def _unreadable(fmt: str) -> tuple[type[BaseException], ...]:
  """What reading a truncated or corrupt input file raises."""
  errors = (OSError, EOFError, tarfile.TarError, zlib.error)
  if fmt == "parquet":
    import pyarrow as pa  # noqa: PLC0415 (only parquet conversion needs it)

    errors += (pa.ArrowException,)
  return errors


def convert(input_spec: str, fmt: str, out: str, *,
            image_column: str = "image", caption_column: str = "caption",
            examples_per_shard: int | None = None, worker_index: int = 0,
            num_workers: int = 1) -> Stats:
  """Converts this worker's share of the input files into shards under
  `out`, resuming an interrupted run of the same arguments
  (cvqcar.data.shard_writer); this worker's counts.

  An input file that cannot be read to its end (a truncated tar, a corrupt
  parquet file) keeps the examples read before the error and is counted
  as skipped.
  """
  if fmt not in FORMATS:
    raise ValueError(f"--format must be one of {FORMATS}, got {fmt!r}")
  paths = (["embedded"] if fmt == "embedded" else
           expand_inputs(input_spec or "", fmt))
  per_shard = examples_per_shard or pairs.DEFAULT_EXAMPLES_PER_SHARD
  manifest = {"conversion": "convert_pairs", "format": fmt, "inputs": paths,
              "examples_per_shard": per_shard}
  if fmt == "parquet":
    manifest.update(image_column=image_column, caption_column=caption_column)
  units = shard_writer.worker_units(len(paths), worker_index, num_workers)
  output = shard_writer.Output(out, manifest)
  stats = Stats(inputs=len(units))
  logging.info("worker %d of %d: converting %d of %d %s inputs into %s",
               worker_index, num_workers, len(units), len(paths), fmt, out)
  unreadable = _unreadable(fmt)
  for unit in units:
    path = paths[unit]
    counts = output.done(unit)
    if counts is not None:  # finished by an earlier run
      stats.add(counts)
      stats.inputs_done += 1
      continue
    before = stats.counts()
    writer = output.start(unit, per_shard)
    if writer.committed:
      logging.info("resuming %s after the %d examples of its %d committed"
                   " shards", path, writer.committed, writer.seq)
    if fmt == "embedded":
      examples = embedded_examples(stats)
    elif fmt == "webdataset":
      examples = webdataset_examples(path, stats)
    else:
      examples = parquet_examples(path, stats, image_column=image_column,
                                  caption_column=caption_column)
    kept = 0
    try:
      for example in examples:
        fresh = kept >= writer.committed  # earlier ones are committed
        if fresh:
          writer.write(example)
        kept += 1
        stats.wrote(fresh)
    except unreadable as e:
      stats.skip("unreadable input file", f"{path}: {e!r}")
    writer.commit()
    output.mark_done(unit, {"input": path, **stats.since(before)})
    stats.inputs_done += 1
    logging.info("done %s: %s", path, stats.summary())
  logging.info("finished worker %d of %d: %s", worker_index, num_workers,
               stats.summary())
  if stats.where:
    logging.info("first skipped: %s", stats.skipped_examples())
  finished = output.all_done()
  if len(finished) == len(paths) and num_workers > 1:
    total = Stats(inputs=len(paths), inputs_done=len(paths))
    for counts in finished:
      total.add(counts)
    logging.info("all workers finished: %s", total.summary())
  return stats
