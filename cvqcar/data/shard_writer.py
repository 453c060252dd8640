"""Resumable, splittable shard output for convert_pairs and tokenize_dataset.

A conversion reads a list of inputs (files, or input shards) and writes each
input's examples as OUT/pairs-IIIII-SSSSS.array_record: input I, shard S of
it. A shard is written under a temporary name and renamed when it is full
(or its input ends), so a reader never sees half a shard and the names need
no total count. When an input is finished, OUT/progress/IIIII.json records
its counts. OUT/manifest.json records the conversion's arguments.

Run again with the same arguments, a conversion skips the finished inputs,
keeps the committed shards of an unfinished one (each input is read in a
fixed order, so the examples they hold are skipped) and drops its temporary
files: the shards after any number of interruptions hold the examples of one
uninterrupted run. Worker w of N converts the inputs I with I % N == w, so
workers (or hosts) can share one output directory.

OUT may be in an object store (gs://): ArrayRecord writes only local files,
so a shard is then written to a local temporary file and uploaded whole when
it is full; the store publishes an object only once it is complete.
"""

from __future__ import annotations

import contextlib
import json
import os
from typing import Any

from array_record.python import array_record_module
from etils import epath

from cvqcar import checkpoint
from cvqcar.data import pairs, paths

MANIFEST = "manifest.json"
PROGRESS = "progress"
TEMP_SUFFIX = ".tmp"  # how checkpoint.local_copy_to's temp files end


def shard_name(unit: int, seq: int) -> str:
  return f"pairs-{unit:05d}-{seq:05d}{pairs.SHARD_SUFFIX}"


def worker_units(num_units: int, worker_index: int,
                 num_workers: int) -> range:
  """The inputs worker `worker_index` of `num_workers` converts."""
  if num_workers < 1 or not 0 <= worker_index < num_workers:
    raise ValueError(f"--worker_index={worker_index} --num_workers="
                     f"{num_workers}: expected 0 <= worker_index <"
                     " num_workers")
  return range(worker_index, num_units, num_workers)


def num_records(path: str) -> int:
  reader = array_record_module.ArrayRecordReader(path)
  try:
    return reader.num_records()
  finally:
    reader.close()


def _short(value: Any, limit: int = 120) -> str:
  text = json.dumps(value, sort_keys=True)
  return text if len(text) <= limit else text[:limit] + "..."


class Output:
  """An output directory that one conversion (its `manifest`) owns."""

  def __init__(self, out_dir: str, manifest: dict[str, Any]):
    self.out_dir = out_dir
    epath.Path(out_dir, PROGRESS).mkdir(parents=True, exist_ok=True)
    manifest = json.loads(json.dumps(manifest))  # tuples as lists, like JSON
    # Shards before the manifest: a worker writes the manifest before its
    # first shard, so one that started beside this one is not taken for a
    # stranger's shards.
    shards = paths.glob(paths.join(out_dir, "*" + pairs.SHARD_SUFFIX))
    done = paths.glob(paths.join(out_dir, f"{PROGRESS}/*.json"))
    path = epath.Path(out_dir, MANIFEST)
    saved = json.loads(path.read_text()) if path.exists() else None
    if saved == manifest:
      return
    if shards or done:
      # Mixing two conversions' shards would silently change the data.
      if saved is None:
        raise FileExistsError(
            f"{out_dir} already holds {len(shards)} shards but no {MANIFEST}"
            " naming the conversion that wrote them; remove them or choose"
            " another output directory")
      differ = sorted(k for k in set(saved) | set(manifest)
                      if saved.get(k) != manifest.get(k))
      detail = "; ".join(f"{k}: {_short(saved.get(k))} there, now"
                         f" {_short(manifest.get(k))}" for k in differ)
      raise FileExistsError(
          f"{out_dir} holds {len(shards)} shards of a different conversion"
          f" ({detail}); rerun with its arguments to resume it, or choose"
          " another output directory")
    # Temp files are left alone here: a worker sharing this directory may be
    # writing one; each unit's are dropped when its owner starts it.
    checkpoint.write_text(out_dir, MANIFEST, json.dumps(manifest, indent=1,
                                                        sort_keys=True))

  def _progress(self, unit: int) -> epath.Path:
    return epath.Path(self.out_dir, PROGRESS, f"{unit:05d}.json")

  def done(self, unit: int) -> dict[str, Any] | None:
    """The counts recorded when `unit` finished, or None."""
    path = self._progress(unit)
    return json.loads(path.read_text()) if path.exists() else None

  def mark_done(self, unit: int, counts: dict[str, Any]) -> None:
    checkpoint.write_text(paths.join(self.out_dir, PROGRESS),
                          self._progress(unit).name,
                          json.dumps(counts, indent=1, sort_keys=True))

  def all_done(self) -> list[dict[str, Any]]:
    """The counts of every finished input."""
    return [json.loads(epath.Path(p).read_text()) for p in paths.glob(
        paths.join(self.out_dir, f"{PROGRESS}/*.json"))]

  def drop_temp(self, unit: int) -> None:
    """Removes the shards of `unit` an interrupted run did not finish
    (beside the shards; for a remote output they were on the local disk)."""
    if "://" not in self.out_dir:
      for temp in paths.glob(paths.join(
          self.out_dir, f".pairs-{unit:05d}-*{TEMP_SUFFIX}")):
        os.remove(temp)

  def start(self, unit: int, examples_per_shard: int) -> UnitWriter:
    """A writer for `unit` after its committed shards; drops its temp files.

    Its `committed` is the number of examples those shards hold.
    """
    self.drop_temp(unit)
    seq, committed = 0, 0
    while epath.Path(self.out_dir, shard_name(unit, seq)).exists():
      committed += num_records(paths.join(self.out_dir,
                                          shard_name(unit, seq)))
      seq += 1
    return UnitWriter(self.out_dir, unit, seq, examples_per_shard, committed)


class UnitWriter:
  """One input's shards: each written to a temp name, renamed when full."""

  def __init__(self, out_dir: str, unit: int, seq: int,
               examples_per_shard: int, committed: int = 0):
    if examples_per_shard < 1:
      raise ValueError(f"examples_per_shard must be at least 1, got"
                       f" {examples_per_shard}")
    self.out_dir, self.unit, self.seq = out_dir, unit, seq
    self.per_shard, self.committed = examples_per_shard, committed
    self._writer, self._count = None, 0
    self._publish = contextlib.ExitStack()  # the open shard's local_copy_to
    self.paths: list[str] = []  # the shards this writer committed

  def _path(self) -> str:
    return paths.join(self.out_dir, shard_name(self.unit, self.seq))

  def write(self, example: dict[str, Any]) -> None:
    record = pairs.serialize(example)  # a bad example raises before a file
    if self._writer is None:
      temp = self._publish.enter_context(
          checkpoint.local_copy_to(epath.Path(self._path())))
      self._writer = array_record_module.ArrayRecordWriter(temp,
                                                           "group_size:1")
    self._writer.write(record)
    self._count += 1
    if self._count == self.per_shard:
      self.commit()

  def commit(self) -> str | None:
    """Closes and renames (or uploads) the open shard, if any; its path."""
    if self._writer is None:
      return None
    self._writer.close()
    self._publish.close()  # renamed over its name, or uploaded whole
    path = self._path()
    self.paths.append(path)
    self.committed += self._count
    self._writer, self._count = None, 0
    self.seq += 1
    return path
