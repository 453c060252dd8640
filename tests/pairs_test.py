"""Text-image pairs: shards, converters, the Grain pipeline, tokenizing."""

import contextlib
import io
import json
import logging
import os
import tarfile

import jax
import numpy as np
import pytest
from array_record.python import array_record_module
from PIL import Image

from cvqcar.data import convert, pairs, shard_writer, text
from cvqcar.data import images as image_data


@contextlib.contextmanager
def stopped_after_a_shard():
  """A conversion in this block stops (KeyboardInterrupt) right after it
  commits its first shard, as a kill there would."""
  commit = shard_writer.UnitWriter.commit

  def commit_once(self):
    path = commit(self)
    if path:
      raise KeyboardInterrupt("stopped after a shard")
    return path

  with pytest.MonkeyPatch.context() as patch:
    patch.setattr(shard_writer.UnitWriter, "commit", commit_once)
    with pytest.raises(KeyboardInterrupt):
      yield

COLORS = {"red": (255, 0, 0), "green": (0, 255, 0), "blue": (0, 0, 255),
          "white": (255, 255, 255), "black": (0, 0, 0),
          "yellow": (255, 255, 0)}
BYTES = text.ByteTokenizer()


def image_bytes(rgb, fmt="PNG", h=20, w=30):
  buf = io.BytesIO()
  Image.fromarray(np.full((h, w, 3), rgb, np.uint8)).save(buf, fmt)
  return buf.getvalue()


def captions_of(batch):
  return [text.decode_padded(BYTES, ids, mask)
          for ids, mask in zip(batch["text"], batch["text_mask"], strict=True)]


def check_captions_match_images(batch):
  """Each image's colour is the one its caption names: pairs stay paired."""
  for caption, image in zip(captions_of(batch), batch["image"], strict=True):
    want = np.array(COLORS[caption.split()[1]]) / 127.5 - 1.0
    np.testing.assert_allclose(image.mean((0, 1)), want, atol=0.05)


def pipeline(source, **kw):
  kw = dict(batch_size=2, seed=0, train=False, text_tokenizer=BYTES,
            max_text_len=24, resolution=8) | kw
  return pairs.pair_pipeline(source, **kw)


def write_tar(path, members):
  with tarfile.open(path, "w") as tar:
    for name, payload in members:
      info = tarfile.TarInfo(name)
      info.size = len(payload)
      tar.addfile(info, io.BytesIO(payload))


def test_records_round_trip_and_garbage_is_an_error():
  image = image_bytes(COLORS["red"])
  record = pairs.deserialize(pairs.serialize(
      {"image": image, "caption": "a red square", "key": "k"}))
  assert record == {"image": image, "caption": "a red square", "key": "k"}
  record = pairs.deserialize(pairs.serialize(
      {"tokens": np.array([3, 1, 4], np.int64), "caption": "x"}))
  assert record["tokens"].dtype == np.int32
  np.testing.assert_array_equal(record["tokens"], [3, 1, 4])
  with pytest.raises(ValueError, match="not a msgpack pair record"):
    pairs.deserialize(b"\xc1garbage")
  with pytest.raises(ValueError, match="caption must be a str, got None"):
    pairs.serialize({"image": image})
  with pytest.raises(ValueError, match="needs 'image'"):
    pairs.serialize({"caption": "x", "image": np.zeros((2, 2, 3))})
  with pytest.raises(ValueError, match="none of the first 2 records"):
    pipeline([b"junk", b"\x81\xa1a\x01"])


def test_write_shards_splits_and_refuses_to_mix(tmp_path):
  examples = [{"image": b"x", "caption": f"c{i}"} for i in range(7)]
  paths = pairs.write_shards(examples, str(tmp_path / "a"), num_shards=3)
  assert [os.path.basename(p) for p in paths] == [
      f"pairs-0000{i}-of-00003.array_record" for i in range(3)]
  source = pairs.read_source(str(tmp_path / "a"))
  assert len(source) == 7
  assert sorted(pairs.deserialize(r)["caption"] for r in source) == sorted(
      e["caption"] for e in examples)
  with pytest.raises(FileExistsError, match="already holds 3 shards"):
    pairs.write_shards(examples, str(tmp_path / "a"))
  paths = pairs.write_shards(examples, str(tmp_path / "b"),
                             examples_per_shard=3)
  assert len(paths) == 3  # 3 + 3 + 1, in order
  assert [pairs.deserialize(r)["caption"] for r in pairs.read_source(
      str(tmp_path / "b"))] == [e["caption"] for e in examples]
  with pytest.raises(ValueError, match="no examples"):
    pairs.write_shards([], str(tmp_path / "c"))
  with pytest.raises(FileNotFoundError, match="no .array_record shards"):
    pairs.read_source(str(tmp_path / "c"))


def test_webdataset_to_shards_to_batches(tmp_path):
  members, want = [], []
  for i, (name, rgb) in enumerate(COLORS.items()):
    key, caption = f"part/{i:04d}", f"a {name} square"
    image = (f"{key}.jpg", image_bytes(rgb, "JPEG")) if i % 2 else (
        f"{key}.png", image_bytes(rgb))
    # Caption before or after the image: pairing must not depend on order.
    members += [image, (f"{key}.txt", caption.encode())][::1 - 2 * (i % 2)]
    members.append((f"{key}.json", b"{}"))  # other members are ignored
    want.append(caption)
  members += [("part/0100.txt", b"a caption without an image"),
              ("part/0101.png", b"not a png"), ("part/0101.txt", b"broken"),
              ("part/0102.png", image_bytes(COLORS["red"]))]
  write_tar(tmp_path / "shard-000.tar", members)
  out = str(tmp_path / "shards")
  stats = convert.convert(str(tmp_path / "*.tar"), "webdataset", out,
                                examples_per_shard=4)
  assert (stats.read, stats.written) == (9, 6)
  assert stats.skipped == {"no image": 1, "image does not open": 1,
                           "no caption": 1}
  assert len(pairs.shard_paths(out)) == 2
  batches = list(pipeline(pairs.read_source(out)))
  assert len(batches) == 3
  for b in batches:
    assert b["image"].shape == (2, 8, 8, 3) and b["image"].dtype == np.float32
    assert b["text"].shape == b["text_mask"].shape == (2, 24)
    assert b["text"].dtype == np.int32 and b["skipped"].shape == (2,)
    check_captions_match_images(b)
  assert sorted(c for b in batches for c in captions_of(b)) == sorted(want)


@pytest.mark.parametrize("form", ["raw", "struct"])
def test_parquet_to_shards(tmp_path, form):
  pa = pytest.importorskip("pyarrow")
  pq = pytest.importorskip("pyarrow.parquet")
  images = [image_bytes(rgb) for rgb in COLORS.values()] + [None]
  captions = [f"a {name} square" for name in COLORS] + ["no image here"]
  captions[1] = None
  if form == "struct":  # As HF datasets write an Image feature.
    column = pa.array([{"bytes": b, "path": f"{i}.png"}
                       for i, b in enumerate(images)])
  else:
    column = pa.array(images, pa.binary())
  path = tmp_path / "train-00000.parquet"
  pq.write_table(pa.table({"jpg": column, "txt": captions,
                           "width": [30] * len(images)}), path)
  out = str(tmp_path / "shards")
  stats = convert.convert(str(tmp_path), "parquet", out,
                                image_column="jpg", caption_column="txt")
  assert stats.written == len(COLORS) - 1
  assert stats.skipped == {"no image": 1, "no caption": 1}
  records = [pairs.deserialize(r) for r in pairs.read_source(out)]
  keep = [i for i in range(len(COLORS)) if i != 1]
  assert [r["caption"] for r in records] == [captions[i] for i in keep]
  assert [r["image"] for r in records] == [images[i] for i in keep]
  check_captions_match_images(next(iter(pipeline(pairs.read_source(out)))))


def test_parquet_column_errors(tmp_path):
  pa = pytest.importorskip("pyarrow")
  pq = pytest.importorskip("pyarrow.parquet")
  path = str(tmp_path / "a.parquet")
  pq.write_table(pa.table({"jpg": [b"x"], "txt": ["c"], "url": ["u"]}), path)
  with pytest.raises(ValueError, match=r"no column 'caption'; its columns are"
                     r" \['jpg', 'txt', 'url'\]"):
    convert.convert(path, "parquet", str(tmp_path / "o"),
                          image_column="jpg")
  with pytest.raises(ValueError, match="column 'url' has type string,"
                     " expected binary"):
    convert.convert(path, "parquet", str(tmp_path / "o"),
                          image_column="url", caption_column="txt")
  with pytest.raises(ValueError, match="--format must be one of"):
    convert.convert(path, "csv", str(tmp_path / "o"))
  with pytest.raises(FileNotFoundError, match="matches no parquet files"):
    convert.convert(str(tmp_path / "*.nope"), "parquet",
                          str(tmp_path / "o"))


def test_corrupt_records_are_skipped_and_counted(tmp_path):
  good = [{"image": image_bytes(rgb), "caption": f"a {name} square"}
          for name, rgb in list(COLORS.items())[:4]]
  bad = {"image": b"\x89PNG not really", "caption": "a broken square"}
  out = str(tmp_path / "shards")
  pairs.write_shards(good[:2] + [bad] + good[2:], out, examples_per_shard=8)
  # A record that is not msgpack at all, in a shard read first.
  writer = array_record_module.ArrayRecordWriter(
      os.path.join(out, "pairs-0.array_record"), "group_size:1")
  writer.write(b"\xc1 not msgpack")
  writer.close()
  batches = list(pipeline(pairs.read_source(out)))
  assert len(batches) == 2  # 4 good pairs in batches of 2
  assert sum(int(b["skipped"].sum()) for b in batches) == 2
  for b in batches:
    check_captions_match_images(b)


def test_train_stream_is_deterministic_and_resumable(tmp_path):
  out = str(tmp_path / "shards")
  pairs.write_shards([{"image": image_bytes(rgb), "caption": f"a {name} sq"}
                      for name, rgb in COLORS.items()], out, num_shards=2)
  it = iter(pipeline(pairs.read_source(out), train=True))
  next(it)
  state = it.get_state()
  want = [captions_of(next(it)) for _ in range(4)]  # past one epoch
  again = iter(pipeline(pairs.read_source(out), train=True))
  again.set_state(state)
  assert [captions_of(next(again)) for _ in range(4)] == want


def test_pretokenized_shards(tmp_path):
  out = str(tmp_path / "tokens")
  pairs.write_shards([{"tokens": np.arange(4) + i, "caption": f"tokens {i}"}
                      for i in range(4)], out, num_shards=2)
  batches = list(pipeline(pairs.read_source(out)))
  assert len(batches) == 2 and "image" not in batches[0]
  for b in batches:
    assert b["tokens"].shape == (2, 4) and b["tokens"].dtype == np.int32
    for caption, tokens in zip(captions_of(b), b["tokens"], strict=True):
      np.testing.assert_array_equal(tokens, np.arange(4) + int(caption[-1]))
  with pytest.raises(ValueError, match="has 4 tokens, expected 5"):
    list(pipeline(pairs.read_source(out), num_tokens=5))
  # Ids up to 6 are written: a 6-code tokenizer cannot have made them.
  list(pipeline(pairs.read_source(out), num_codes=7))
  with pytest.raises(ValueError, match=r"token id 6, outside 0\.\.5"):
    list(pipeline(pairs.read_source(out), num_codes=6))


def test_processes_read_disjoint_shares(monkeypatch):
  rng = np.random.default_rng(0)
  records = [{"image": rng.integers(0, 256, (8, 8, 3), np.uint8),
              "caption": f"photo {i}"} for i in range(12)]

  def captions(index, count):
    monkeypatch.setattr(jax, "process_index", lambda: index)
    monkeypatch.setattr(jax, "process_count", lambda: count)
    return [c for b in pipeline(records, batch_size=4) for c in captions_of(b)]

  shares = [set(captions(i, 2)) for i in range(2)]
  assert len(shares[0]) == len(shares[1]) == 6
  assert not shares[0] & shares[1]
  assert shares[0] | shares[1] == set(captions(0, 1))
  monkeypatch.setattr(jax, "process_count", lambda: 3)
  with pytest.raises(ValueError, match="not divisible by the 3 JAX processes"):
    pipeline(records, batch_size=4)


def test_every_embedded_photo_has_a_caption():
  splits = {s: pairs.embedded_pairs(s) for s in ("train", "eval")}
  names = {r["name"] for s in splits for r in image_data.embedded_photos(s)}
  assert set(pairs.EMBEDDED_CAPTIONS) == names  # none missing, none stale
  eval_files = set(image_data.EMBEDDED_EVAL_FILES)
  assert {r["key"] for r in splits["eval"]} == eval_files
  records = splits["train"] + splits["eval"]
  assert len(records) == len(names)
  captions = [r["caption"] for r in records]
  assert len(set(captions)) == len(captions) and all(captions)
  assert pairs.EMBEDDED_CAPTIONS["chelsea.png"] == "a ginger tabby cat"
  # Whole captions within the tiny config's 64 byte tokens.
  assert max(len(BYTES.encode(c)) for c in captions) <= 64


def car_config():
  from configs import car_stage1  # CAR's data settings.

  config = car_stage1.get_config("tiny")
  config.data.num_eval_examples = 16
  config.data.num_threads = 2
  return config


def test_config_datasets_embedded():
  config = car_config()
  batch = next(iter(pairs.train_dataset(config, BYTES)))
  r, b, n = config.tokenizer.resolution, config.batch_size, config.max_text_len
  assert batch["image"].shape == (b, r, r, 3)
  assert batch["text"].shape == batch["text_mask"].shape == (b, n)
  assert set(captions_of(batch)) <= set(pairs.EMBEDDED_CAPTIONS.values())
  a = [x["image"] for x in pairs.eval_dataset(config, BYTES)]
  again = [x["image"] for x in pairs.eval_dataset(config, BYTES)]
  assert len(a) == 1
  np.testing.assert_array_equal(a[0], again[0])


def test_config_shards_must_match_pretokenized(tmp_path):
  config = car_config()
  config.data.name = "shards"
  with pytest.raises(ValueError, match="config.data.shards must name"):
    pairs.train_dataset(config, BYTES)
  out = str(tmp_path / "shards")
  pairs.write_shards([{"image": image_bytes(COLORS["red"]),
                       "caption": "a red square"}], out)
  config.data.shards = out
  config.data.pretokenized = True
  with pytest.raises(ValueError, match="holds image records but"
                     " config.data.pretokenized=True"):
    pairs.train_dataset(config, BYTES)
  config.data.name = "laion"
  with pytest.raises(ValueError, match="'embedded', 'shards' or"
                     " 'fashion_mnist', got 'laion'"):
    pairs.train_dataset(config, BYTES)


def test_pretokenized_shards_of_another_tokenizer_are_refused(tmp_path,
                                                              caplog):
  config = car_config()
  k, c = config.tokenizer.num_codes, config.tokenizer.latent_channels
  out = str(tmp_path / "tokens")
  pairs.write_shards([{"tokens": np.arange(c) % k, "caption": "a cat"}] * 2,
                     out)
  exports = {}
  for name, digit in (("made_with", "a"), ("other", "b")):
    exports[name] = tmp_path / name
    exports[name].mkdir()
    (exports[name] / "export.json").write_text(
        json.dumps({"sha256": digit * 64}))
  (tmp_path / "tokens" / "tokenizer_export.json").write_text(json.dumps(
      {"source": str(exports["made_with"]), "sha256": "a" * 64}))
  config.data.update(name="shards", shards=out, pretokenized=True)
  config.tokenizer_export = str(exports["other"])
  with pytest.raises(ValueError, match=r"the shard directory .*tokens was"
                     r" made with .*made_with \(sha256 a{12}\.\.\.\).*"
                     r"other \(sha256 b{12}\.\.\.\)"):
    pairs.train_dataset(config, BYTES)
  config.allow_tokenizer_mismatch = True
  with caplog.at_level(logging.WARNING):
    next(iter(pairs.train_dataset(config, BYTES)))
  assert "a" * 12 in caplog.text and "b" * 12 in caplog.text
  config.allow_tokenizer_mismatch = False
  config.tokenizer_export = str(exports["made_with"])
  batch = next(iter(pairs.train_dataset(config, BYTES)))
  assert batch["tokens"].shape == (config.batch_size, c)


def test_embedded_conversion_writes_every_photo(tmp_path):
  out = str(tmp_path / "embedded")
  stats = convert.convert("", "embedded", out, examples_per_shard=10)
  assert stats.written == len(pairs.EMBEDDED_CAPTIONS)
  captions = {pairs.deserialize(r)["caption"]
              for r in pairs.read_source(out)}
  assert captions == set(pairs.EMBEDDED_CAPTIONS.values())


@pytest.mark.slow
def test_tokenize_dataset_matches_the_tokenizer(tmp_path, tokenizer_export):
  from cvqcar.car import pretokenize
  from cvqcar.tokenizer import export

  rng = np.random.default_rng(0)
  examples = []
  for i, (h, w) in enumerate([(20, 30), (40, 16), (16, 16), (33, 47),
                              (64, 20)]):
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (h, w, 3), np.uint8)).save(buf,
                                                                    "PNG")
    examples.append({"image": buf.getvalue(), "caption": f"noise {i}",
                     "key": str(i)})
  images_dir, tokens_dir = str(tmp_path / "images"), str(tmp_path / "tokens")
  pairs.write_shards(examples[:2] + [{"image": b"junk", "caption": "bad"}]
                     + examples[2:], images_dir, num_shards=2)
  stats = pretokenize.tokenize_shards(tokenizer_export, images_dir,
                                           tokens_dir, batch_size=2)
  assert stats == {"read": 6, "written": 5, "skipped": 1}
  tokenizer = export.load_tokenizer(tokenizer_export)
  got = {r["key"]: r for r in map(pairs.deserialize,
                                  pairs.read_source(tokens_dir))}
  assert sorted(got) == [e["key"] for e in examples]
  crop = image_data.Preprocess(tokenizer.resolution, crop="center")
  images = np.stack([crop(e, None)["image"] for e in examples])
  want = np.asarray(tokenizer.encode(images))
  assert want.shape == (5, tokenizer.num_tokens)
  for e, tokens in zip(examples, want, strict=True):
    assert got[e["key"]]["caption"] == e["caption"]
    np.testing.assert_array_equal(got[e["key"]]["tokens"], tokens)
  # The shards name the export that made them (pairs checks it).
  assert (json.loads((tmp_path / "tokens" / "tokenizer_export.json")
                     .read_text()) == export.tokenizer_record(tokenizer_export))
  batch = next(iter(pipeline(pairs.read_source(tokens_dir),
                             num_tokens=tokenizer.num_tokens)))
  assert batch["tokens"].shape == (2, tokenizer.num_tokens)
  with pytest.raises(ValueError, match="hold tokens already"):
    pretokenize.tokenize_shards(tokenizer_export, tokens_dir,
                                     str(tmp_path / "again"))

  # Interrupted after its first committed shard, a run resumes to the same
  # examples; two workers split the input shards into the same examples.
  def tokens_of(out):
    return sorted((r["key"], r["caption"], r["tokens"].tobytes())
                  for r in map(pairs.deserialize, pairs.read_source(out)))

  resumed = str(tmp_path / "resumed")
  with stopped_after_a_shard():
    pretokenize.tokenize_shards(tokenizer_export, images_dir, resumed,
                                batch_size=3, examples_per_shard=2)
  assert len(pairs.shard_paths(resumed)) == 1
  stats = pretokenize.tokenize_shards(tokenizer_export, images_dir, resumed,
                                      batch_size=3, examples_per_shard=2)
  assert stats == {"read": 6, "written": 5, "skipped": 1}
  assert tokens_of(resumed) == tokens_of(tokens_dir)
  split = str(tmp_path / "split")
  for w in (0, 1):
    pretokenize.tokenize_shards(tokenizer_export, images_dir, split,
                                examples_per_shard=2, worker_index=w,
                                num_workers=2)
  assert tokens_of(split) == tokens_of(tokens_dir)
  with pytest.raises(FileExistsError, match="different conversion"):
    pretokenize.tokenize_shards(tokenizer_export, images_dir, split)


def test_encoder_batches_split_over_the_devices():
  from cvqcar.car import pretokenize

  assert [pretokenize.encode_rows(n, 8) for n in (1, 8, 9, 64)] == [
      8, 8, 16, 64]
  assert pretokenize.encode_rows(5, 1) == 5


def test_padded_eval_batches_count_every_pair_once(tmp_path, monkeypatch):
  config = car_config()
  c = config.tokenizer.latent_channels
  out = str(tmp_path / "tokens")
  pairs.write_shards([{"tokens": np.full(c, i), "caption": f"pair {i}"}
                      for i in range(5)], out, num_shards=2)
  config.data.update(name="shards", shards=out, pretokenized=True,
                     num_eval_examples=8)  # more than the 5 records
  config.eval_batch_size = 4

  def eval_pairs(index, count):
    monkeypatch.setattr(jax, "process_index", lambda: index)
    monkeypatch.setattr(jax, "process_count", lambda: count)
    batches = list(pairs.padded_eval_batches(config, BYTES))
    assert all(b["tokens"].shape == (4 // count, c) for b in batches)
    assert int(batches[-1]["corrupt"]) == 0
    real = [(caption, int(tokens[0])) for b in batches
            for caption, tokens, m in zip(captions_of(b), b["tokens"],
                                          b["mask"], strict=True) if m]
    return len(batches), real

  n, real = eval_pairs(0, 1)
  assert n == 2 and sorted(real) == [(f"pair {i}", i) for i in range(5)]
  shares = [eval_pairs(i, 2) for i in range(2)]
  assert [n for n, _ in shares] == [2, 2]  # same count on every process
  assert sorted(shares[0][1] + shares[1][1]) == sorted(real)
  # Embedded photos: 3 image crops in one batch of 16.
  monkeypatch.undo()
  config = car_config()
  config.data.num_eval_examples = 3
  (batch,) = pairs.padded_eval_batches(config, BYTES)
  assert batch["image"].shape[0] == config.batch_size == 16
  assert batch["mask"].sum() == 3 and not batch["image"][3:].any()
  config.data.num_eval_examples = 0
  with pytest.raises(ValueError, match="num_eval_examples=0 and the eval"
                     " source holds 3 records"):
    pairs.padded_eval_batches(config, BYTES)

def test_images_under_the_minimum_size_are_skipped_and_counted():
  records = [{"image": image_bytes(COLORS[name], h=h), "caption": f"a {name}"
              " square"} for name, h in (("red", 20), ("blue", 5),
                                         ("green", 20))]
  batches = list(pipeline(records, min_size=10))
  assert len(batches) == 1 and int(batches[0]["skipped"].sum()) == 1
  assert captions_of(batches[0]) == ["a red square", "a green square"]
