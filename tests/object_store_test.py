"""Shards and image folders in an object store (gs://), found through
etils.epath: a fake bucket backed by a local directory, with os.path and
glob refusing gs:// paths."""

import glob
import io
import os

import grain
import numpy as np
import pytest
from etils.epath import gpath
from etils.epath import testing as epath_testing
from PIL import Image

from cvqcar.data import images as image_data
from cvqcar.data import pairs, text

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
                       (os.path, "isfile"), (os, "listdir"), (glob, "glob")):
    monkeypatch.setattr(module, name, local_only(getattr(module, name)))
  # epath sends gs:// to TensorFlow's GCS file system when TF is installed.
  monkeypatch.setattr(gpath, "_is_tf_installed", lambda: False)
  with epath_testing.mock_epath(
      exists=lambda fn, p: fn(local(p)), isdir=lambda fn, p: fn(local(p)),
      listdir=lambda fn, p: fn(local(p)),
      glob=lambda fn, p: [remote(x) for x in fn(local(p))],
      open=lambda fn, p, mode: fn(local(p), mode)):
    yield root


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
