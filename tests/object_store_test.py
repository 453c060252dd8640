"""Shards and image folders in an object store (gs://), found through
etils.epath: a fake bucket backed by a local directory, with os.path, os and
glob refusing gs:// paths."""

import glob
import io
import os
import pathlib

import grain
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
import pytest
from array_record.python import array_record_module
from convert_test import examples, write_inputs
from etils.epath import gpath
from etils.epath import testing as epath_testing
from pairs_test import stopped_after_a_shard
from PIL import Image

from cvqcar import checkpoint, fingerprint
from cvqcar.data import convert, pairs, text
from cvqcar.data import images as image_data

BUCKET = "gs://bucket"


@pytest.fixture
def bucket(tmp_path, monkeypatch):
  """The local directory that BUCKET stands for; epath's gs:// backend
  reads it, and os.path / glob fail on any gs:// path."""
  root = str(tmp_path / "bucket")
  os.makedirs(root)
  local = lambda p: os.fspath(p).replace(BUCKET, root, 1)
  remote = lambda p: os.fspath(p).replace(root, BUCKET, 1)

  def local_only(fn):
    def guarded(path, *args, **kwargs):
      assert not os.fspath(path).startswith("gs://"), (fn, path)
      return fn(path, *args, **kwargs)
    return guarded

  for module, name in ((os.path, "isdir"), (os.path, "exists"),
                       (os.path, "isfile"), (os, "listdir"), (glob, "glob"),
                       (os, "makedirs"), (os, "mkdir"), (os, "replace"),
                       (os, "rename"), (os, "remove")):
    monkeypatch.setattr(module, name, local_only(getattr(module, name)))
  # epath sends gs:// to TensorFlow's GCS file system when TF is installed.
  monkeypatch.setattr(gpath, "_is_tf_installed", lambda: False)

  def on_disk(fn, *args, **kwargs):  # every gs:// argument to its directory
    return fn(*(local(a) if os.fspath(a).startswith(BUCKET) else a
                for a in args), **kwargs)

  with epath_testing.mock_epath(
      exists=on_disk, isdir=on_disk, listdir=on_disk, open=on_disk,
      makedirs=on_disk, mkdir=on_disk, remove=on_disk, rename=on_disk,
      replace=on_disk, rmtree=on_disk, stat=on_disk, copy=on_disk,
      glob=lambda fn, p: [remote(x) for x in fn(local(p))]):
    yield root


@pytest.fixture
def bucket_records(bucket, monkeypatch):
  """ArrayRecord reads gs:// paths itself (its GCS reader); here its reader
  reads the bucket's directory."""
  real = array_record_module.ArrayRecordReader
  monkeypatch.setattr(
      array_record_module, "ArrayRecordReader", lambda path, *a, **k: real(
          os.fspath(path).replace(BUCKET, bucket, 1), *a, **k))
  return bucket


def png(rgb):
  buf = io.BytesIO()
  Image.fromarray(np.full((12, 12, 3), rgb, np.uint8)).save(buf, "PNG")
  return buf.getvalue()


def test_pair_shards_in_a_bucket(bucket, monkeypatch):
  pairs.write_shards([{"image": png((255, 0, 0)), "caption": "red"},
                      {"image": png((0, 0, 255)), "caption": "blue"}],
                     os.path.join(bucket, "shards"), num_shards=2)
  want = [f"{BUCKET}/shards/pairs-0000{i}-of-00002.array_record"
          for i in range(2)]
  assert pairs.shard_paths(f"{BUCKET}/shards") == want
  assert pairs.shard_paths(f"{BUCKET}/*/pairs-*-of-00002.array_record") == want
  assert pairs.shard_paths(",".join(want)) == want
  with pytest.raises(FileNotFoundError, match="no .array_record shards"):
    pairs.shard_paths(f"{BUCKET}/elsewhere")
  # ArrayRecord opens gs:// paths itself; here it reads the bucket's files.
  real, opened = grain.sources.ArrayRecordDataSource, []
  monkeypatch.setattr(grain.sources, "ArrayRecordDataSource", lambda paths: (
      opened.extend(paths) or real([p.replace(BUCKET, bucket) for p in paths])))
  batch = next(iter(pairs.pair_pipeline(
      pairs.read_source(f"{BUCKET}/shards"), batch_size=2, seed=0,
      train=False, text_tokenizer=text.ByteTokenizer(), max_text_len=8,
      resolution=8)))
  assert opened == want and batch["image"].shape == (2, 8, 8, 3)


def test_image_folder_in_a_bucket(bucket):
  os.makedirs(os.path.join(bucket, "photos"))
  for name, rgb in (("b.png", (0, 255, 0)), ("a.PNG", (9, 9, 9))):
    with open(os.path.join(bucket, "photos", name), "wb") as f:
      f.write(png(rgb))
  with open(os.path.join(bucket, "photos", "notes.txt"), "w") as f:
    f.write("not an image")
  folder = image_data.FolderImages(f"{BUCKET}/photos")
  assert folder.names == ["a.PNG", "b.png"] and len(folder) == 2
  np.testing.assert_array_equal(
      image_data.decode_image(folder[1]["image"])[0, 0], (0, 255, 0))
  with pytest.raises(FileNotFoundError, match="does not exist"):
    image_data.FolderImages(f"{BUCKET}/missing")


def test_conversion_reads_and_writes_a_bucket(bucket_records, tmp_path,
                                              monkeypatch):
  """convert_pairs takes its tars from the bucket and writes its shards,
  progress and manifest there (each shard staged on the local disk and
  uploaded whole); stopped after a shard, it resumes in the bucket to the
  examples of a local run."""
  write_inputs(pathlib.Path(bucket_records))  # a truncated tar among them
  want = str(tmp_path / "local")
  want_stats = convert.convert(f"{bucket_records}/part-*.tar", "webdataset",
                               want, examples_per_shard=2)
  monkeypatch.chdir(tmp_path)  # where a gs: directory would appear
  spec, out = f"{BUCKET}/part-{{0..2}}.tar", f"{BUCKET}/shards"
  with stopped_after_a_shard():
    convert.convert(spec, "webdataset", out, examples_per_shard=2)
  assert pairs.shard_paths(out) == [f"{out}/pairs-00000-00000.array_record"]
  stats = convert.convert(spec, "webdataset", out, examples_per_shard=2)
  assert (stats.read, stats.written, stats.skipped) == (
      want_stats.read, want_stats.written, want_stats.skipped)
  assert examples(out) == examples(want)
  shards = os.path.join(bucket_records, "shards")
  assert sorted(os.listdir(os.path.join(shards, "progress"))) == [
      "00000.json", "00001.json", "00002.json"]
  assert "manifest.json" in os.listdir(shards)
  assert not [n for n in os.listdir(shards) if n.endswith(".tmp")]
  assert not os.path.exists(tmp_path / "gs:")


@pytest.mark.slow
def test_tokenize_dataset_reads_and_writes_a_bucket(bucket_records, tmp_path,
                                                    tokenizer_export):
  from cvqcar.car import pretokenize

  pairs.write_shards([{"image": png(c), "caption": f"{c}", "key": f"{i}"}
                      for i, c in enumerate([(255, 0, 0), (0, 255, 0),
                                             (0, 0, 255)])],
                     os.path.join(bucket_records, "images"), num_shards=2)
  want = str(tmp_path / "local")
  pretokenize.tokenize_shards(tokenizer_export, f"{bucket_records}/images",
                              want)
  out = f"{BUCKET}/tokens"
  stats = pretokenize.tokenize_shards(tokenizer_export, f"{BUCKET}/images",
                                      out, batch_size=2)
  assert stats == {"read": 3, "written": 3, "skipped": 0}

  def tokens_of(spec):
    return sorted((r["key"], r["caption"], r["tokens"].tobytes())
                  for r in map(pairs.deserialize, pairs.read_source(spec)))

  assert tokens_of(out) == tokens_of(want)
  names = sorted(os.listdir(os.path.join(bucket_records, "tokens")))
  assert names == ["manifest.json", "pairs-00000-00000.array_record",
                   "pairs-00001-00000.array_record", "progress",
                   "tokenizer_export.json"]


def test_export_in_a_bucket(bucket, monkeypatch, tmp_path):
  """An export written to gs:// (safetensors staged on the local disk and
  uploaded whole) is fingerprinted and restored there from its safetensors;
  Orbax, which writes gs:// itself, is handed the URL as it is."""
  handed = []

  class Orbax:  # records where it was asked to write
    def __init__(self, *args, **kwargs):
      pass

    def __enter__(self):
      return self

    def __exit__(self, *exc):
      return False

    def save(self, directory, *args, **kwargs):
      handed.append(directory)

  monkeypatch.setattr(ocp, "StandardCheckpointer", Orbax)
  monkeypatch.chdir(tmp_path)  # where a gs: directory would appear
  out = f"{BUCKET}/exports/e"
  tree = {"params": {"w": jnp.arange(6.0).reshape(2, 3),
                     "b": jnp.ones(3, jnp.bfloat16)}}
  checkpoint.save_export(out, ml_collections.ConfigDict({"a": 1}), tree)
  assert handed == [f"{out}/params"]
  there = os.path.join(bucket, "exports", "e")
  assert sorted(os.listdir(there)) == ["config.json", "export.json",
                                       "model.safetensors"]
  sha = checkpoint.tree_sha256(tree)
  assert fingerprint.export_sha256(out) == sha
  os.remove(os.path.join(there, "export.json"))
  assert fingerprint.export_sha256(out) == sha  # the safetensors header
  target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype),
                        tree)
  got = checkpoint.restore_export(out, target)
  jax.tree.map(np.testing.assert_array_equal, got, tree)
  assert not os.path.exists(tmp_path / "gs:")


def test_parquet_in_a_bucket(bucket_records, tmp_path):
  """A bucket directory of parquet files is listed and read through epath."""
  pa = pytest.importorskip("pyarrow")
  pq = pytest.importorskip("pyarrow.parquet")
  images = [png((255, 0, 0)), png((0, 0, 255))]
  pq.write_table(pa.table({"image": images, "caption": ["red", "blue"]}),
                 os.path.join(bucket_records, "part-0.parquet"))
  out = str(tmp_path / "shards")
  stats = convert.convert(BUCKET, "parquet", out)
  assert (stats.read, stats.written) == (2, 2)
  records = [pairs.deserialize(r) for r in pairs.read_source(out)]
  assert [(r["key"], r["caption"], r["image"]) for r in records] == [
      ("part-0.parquet:0", "red", images[0]),
      ("part-0.parquet:1", "blue", images[1])]
