"""Content fingerprints of exports, and the records that pin a run to one.

An export's fingerprint is a sha256 over its arrays (names, dtypes, shapes
and bytes, in name order), kept in OUT/export.json and in the safetensors
metadata. Whatever is made with a tokenizer export (a CAR or DQ-Transformer
workdir, a CAR export, pre-tokenized shards) records the export's path and
fingerprint in tokenizer_export.json; whatever reads it with a tokenizer
again refuses one with another fingerprint, unless told to allow it. Only
numpy and JSON here: the data pipelines check shards without model code.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator, Mapping

import numpy as np
from etils import epath

EXPORT_FILE = "export.json"
SAFETENSORS = "model.safetensors"
# Not tokenizer.json: that is the name of a Hugging Face text tokenizer.
RECORD_FILE = "tokenizer_export.json"
CONFIG_OPT_OUT = "config.allow_tokenizer_mismatch=True"
FLAG_OPT_OUT = "--allow_tokenizer_mismatch"


def arrays_sha256(arrays: Mapping[str, np.ndarray]) -> str:
  """sha256 over each array's name, dtype, shape and bytes, in name order:
  equal exactly when the arrays are."""
  h = hashlib.sha256()
  for name in sorted(arrays):
    a = np.asarray(arrays[name])
    if a.dtype.byteorder == ">":  # the same numbers hash the same anywhere
      a = a.astype(a.dtype.newbyteorder("<"))
    header = json.dumps([name, a.dtype.name, list(a.shape)])
    h.update(header.encode() + b"\0")
    h.update(np.ascontiguousarray(a).reshape(-1).view(np.uint8).data)
  return h.hexdigest()


def export_sha256(path: str) -> str | None:
  """The fingerprint of the export at `path`: from OUT/export.json, else
  the safetensors metadata, else hashed from the safetensors arrays (an
  export written before fingerprints); None without any of them."""
  if not path:
    return None
  directory = epath.Path(path)
  meta = directory / EXPORT_FILE
  if meta.exists():
    return json.loads(meta.read_text())["sha256"]
  file = directory / SAFETENSORS
  if not file.exists():
    return None
  from safetensors.numpy import load_file  # noqa: PLC0415

  with file.open("rb") as f:  # the header: its u64 length, then JSON
    header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
  sha256 = (header.get("__metadata__") or {}).get("sha256")
  if sha256:
    return sha256
  logging.info("%s has no fingerprint yet: hashing its arrays", path)
  with local_file(os.fspath(file)) as local:
    return arrays_sha256(load_file(local))


@contextlib.contextmanager
def local_file(path: str) -> Iterator[str]:
  """`path` itself if local, else a temporary local copy of it: for readers
  of local files only (safetensors)."""
  if "://" not in path:
    yield path
    return
  with tempfile.TemporaryDirectory(prefix="cvqcar-") as staging:
    local = os.path.join(staging, path.rpartition("/")[2])
    with epath.Path(path).open("rb") as src, open(local, "wb") as dst:
      shutil.copyfileobj(src, dst, 1 << 24)
    yield local


def record(path: str, sha256: str) -> dict[str, str]:
  """What tokenizer_export.json holds: the export's path and fingerprint."""
  source = path if "://" in path else os.path.abspath(path)
  return {"source": source, "sha256": sha256}


def export_record(path: str) -> dict[str, str] | None:
  """The record of the export at `path`; None where export_sha256 is."""
  sha256 = export_sha256(path)
  return None if sha256 is None else record(path, sha256)


def read_record(directory: str) -> dict[str, str] | None:
  path = epath.Path(directory) / RECORD_FILE
  return json.loads(path.read_text()) if path.exists() else None


def record_json(rec: dict[str, str]) -> str:
  return json.dumps(rec, indent=2, sort_keys=True)


def check_record(directory: str, current: dict[str, str] | None, what: str,
                 *, allow: bool = False, opt_out: str = CONFIG_OPT_OUT,
                 warn_if_missing: bool = False) -> None:
  """Refuses `directory` (described by `what`, e.g. 'the workdir') whose
  recorded tokenizer export has another fingerprint than `current`; with
  `allow`, a warning names both instead."""
  saved = read_record(directory)
  if saved is None or current is None:
    if warn_if_missing:
      missing = (f"{directory} has no {RECORD_FILE}" if saved is None else
                 "this run's tokenizer export has no fingerprint")
      logging.warning("cannot check that %s %s was made with this"
                      " tokenizer: %s", what, directory, missing)
    return
  if saved["sha256"] == current["sha256"]:
    return
  message = (
      f"{what} {directory} was made with the tokenizer export"
      f" {saved['source']} (sha256 {saved['sha256'][:12]}...), but this"
      f" run's tokenizer export is {current['source']} (sha256"
      f" {current['sha256'][:12]}...): another codebook and decoder")
  if not allow:
    raise ValueError(f"{message}. Use the export it was made with, or set"
                     f" {opt_out} to pair them on purpose")
  logging.warning("%s; going on, as %s asks", message, opt_out)
