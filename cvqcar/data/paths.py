"""Files on local disks and object stores (gs://, s3://) through etils.epath.

`os.path` and `glob` see only local files: a `gs://` directory is never a
directory to them and a `gs://` glob matches nothing. The data readers find
their files here instead, so shards, image folders and TFDS directories may
live in a bucket.
"""

from __future__ import annotations

import os

from etils import epath

_WILDCARDS = "*?["


def is_dir(path: str) -> bool:
  return epath.Path(path).is_dir()


def glob(pattern: str) -> list[str]:
  """The sorted paths a glob matches; wildcards may sit in any component
  (`gs://bucket/*/pairs-*.array_record`), not '**'."""
  first = min((pattern.find(c) for c in _WILDCARDS if c in pattern),
              default=-1)
  if first < 0:
    return [pattern] if epath.Path(pattern).exists() else []
  anchor, _, rest = pattern[:first].rpartition("/")
  rest += pattern[first:]
  if not anchor and pattern.startswith("/"):
    anchor = "/"
  root = epath.Path(anchor or ".")
  if not anchor:  # a relative pattern keeps its relative matches
    return sorted(os.fspath(p.relative_to(root)) for p in root.glob(rest))
  return sorted(os.fspath(p) for p in root.glob(rest))


def list_files(directory: str, suffixes: tuple[str, ...]) -> list[str]:
  """The sorted names of the files in `directory` ending in one of
  `suffixes` (case-insensitive)."""
  return sorted(p.name for p in epath.Path(directory).iterdir()
                if p.name.lower().endswith(suffixes))


def join(directory: str, name: str) -> str:
  return os.fspath(epath.Path(directory) / name)


def read_bytes(path: str) -> bytes:
  return epath.Path(path).read_bytes()
