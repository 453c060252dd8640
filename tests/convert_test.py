"""Conversions that survive bad inputs, a kill, and a split over workers."""

import collections
import glob
import os
import signal
import subprocess
import sys
import tarfile
import time

import pytest
from pairs_test import COLORS, image_bytes, write_tar

from cvqcar.data import convert, pairs, shard_writer

ROOT = os.path.join(os.path.dirname(__file__), "..")
# convert_pairs in a subprocess, each image check slowed so that it can be
# killed between its first committed shard and its end.
SLOW_CONVERT = """
import sys, time
from absl import app
from cvqcar import convert_pairs
from cvqcar.data import convert
check = convert._check_image
convert._check_image = lambda image: (time.sleep(0.2), check(image))[1]
app.run(convert_pairs.main)
"""


def write_inputs(root):
  """Three tars: one with a non-UTF-8 caption, one truncated mid-member."""
  colors = list(COLORS.items())
  for t in range(3):
    members = []
    for i in range(6):
      name, rgb = colors[(t + i) % len(colors)]
      key = f"t{t}/{i:03d}"
      members += [(f"{key}.png", image_bytes(rgb, w=20 + i)),
                  (f"{key}.txt", f"a {name} square {t}.{i}".encode())]
    if t == 0:
      members += [("t0/bad.png", image_bytes(COLORS["red"])),
                  ("t0/bad.txt", b"\xff\xfe not utf-8")]
    write_tar(root / f"part-{t}.tar", members)
  with tarfile.open(root / "part-1.tar") as tar:
    cut = tar.getmember("t1/003.png").offset_data + 40
  with open(root / "part-1.tar", "r+b") as f:
    f.truncate(cut)  # inside a member's data


def examples(out):
  """The multiset of (key, caption, image bytes) under `out`."""
  return collections.Counter(
      (r["key"], r["caption"], r["image"])
      for r in map(pairs.deserialize, pairs.read_source(out)))


def test_killed_conversion_resumes_to_the_same_examples(tmp_path):
  write_inputs(tmp_path)
  spec = str(tmp_path / "*.tar")
  want_dir = str(tmp_path / "want")
  want = convert.convert(spec, "webdataset", want_dir, examples_per_shard=2)
  # Bad inputs are counted, not fatal; the good examples of each are kept.
  assert want.skipped["caption is not UTF-8"] == 1
  assert want.skipped["unreadable input file"] == 1
  assert "part-1.tar" in want.where["unreadable input file"][0]
  assert 12 < want.written < 18 and want.inputs_done == 3

  out = str(tmp_path / "out")
  env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu")
  proc = subprocess.Popen(
      [sys.executable, "-c", SLOW_CONVERT, f"--input={spec}",
       "--format=webdataset", f"--out={out}", "--examples_per_shard=2"],
      cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
  deadline = time.time() + 120
  while not glob.glob(os.path.join(out, "*.array_record")):
    assert proc.poll() is None, proc.stderr.read().decode()[-3000:]
    assert time.time() < deadline, "no shard committed in 120 s"
    time.sleep(0.02)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  proc.stderr.close()
  assert proc.returncode == -signal.SIGKILL
  assert not os.listdir(os.path.join(out, shard_writer.PROGRESS))  # midway
  assert 0 < len(examples(out)) < want.written

  got = convert.convert(spec, "webdataset", out, examples_per_shard=2)
  assert examples(out) == examples(want_dir)
  assert sum(examples(out).values()) == want.written  # no duplicates
  assert (got.read, got.written, got.skipped) == (want.read, want.written,
                                                  want.skipped)
  assert not [n for n in os.listdir(out)
              if n.endswith(shard_writer.TEMP_SUFFIX)]
  # Done: a third run converts nothing and changes nothing.
  shards = sorted(os.listdir(out))
  convert.convert(spec, "webdataset", out, examples_per_shard=2)
  assert sorted(os.listdir(out)) == shards

  # Another conversion's arguments are refused, naming what differs.
  with pytest.raises(FileExistsError, match="different conversion.*"
                     "examples_per_shard: 2 there, now 3"):
    convert.convert(spec, "webdataset", out, examples_per_shard=3)


def test_workers_split_the_inputs(tmp_path):
  write_inputs(tmp_path)
  spec = str(tmp_path / "*.tar")
  want = convert.convert(spec, "webdataset", str(tmp_path / "want"),
                         examples_per_shard=4)
  out = str(tmp_path / "out")
  counts = [convert.convert(spec, "webdataset", out, examples_per_shard=4,
                            worker_index=w, num_workers=2) for w in (0, 1)]
  assert [c.inputs for c in counts] == [2, 1]
  assert examples(out) == examples(str(tmp_path / "want"))
  assert sum(c.written for c in counts) == want.written
  with pytest.raises(ValueError, match="--worker_index=2 --num_workers=2"):
    convert.convert(spec, "webdataset", out, worker_index=2, num_workers=2)


def test_bad_parquet_inputs_are_counted(tmp_path):
  pa = pytest.importorskip("pyarrow")
  pq = pytest.importorskip("pyarrow.parquet")
  good = [image_bytes(rgb) for rgb in COLORS.values()]
  pq.write_table(pa.table({"image": good, "caption": [f"c{i}" for i in
                                                      range(len(good))]}),
                 tmp_path / "a.parquet")
  pq.write_table(pa.table({"image": good[:2], "caption": [7, 8]}),
                 tmp_path / "b.parquet")
  (tmp_path / "c.parquet").write_bytes(b"PAR1 not really parquet")
  stats = convert.convert(str(tmp_path), "parquet", str(tmp_path / "out"))
  assert stats.written == len(good)
  assert stats.skipped == {"caption is not a string": 2,
                           "unreadable input file": 1}
  assert stats.where["unreadable input file"][0].startswith(
      str(tmp_path / "c.parquet"))
