"""Grain pipelines: embedded photos, preprocessing, corrupt records."""

import io

import jax
import numpy as np
import pytest
from PIL import Image

from conftest import tiny_config
from cvqcar.data import images as image_data


def png_bytes(rng, h=40, w=50):
  buf = io.BytesIO()
  Image.fromarray(rng.integers(0, 256, (h, w, 3), np.uint8)).save(buf, "PNG")
  return buf.getvalue()


def test_embedded_photos_are_real_and_split():
  train = image_data.embedded_photos("train")
  evals = image_data.embedded_photos("eval")
  assert len(train) >= 20 and len(evals) == len(image_data.EMBEDDED_EVAL_FILES)
  assert not {r["name"] for r in train} & {r["name"] for r in evals}
  for r in train + evals:
    assert r["image"].dtype == np.uint8 and r["image"].shape[-1] == 3
    assert min(r["image"].shape[:2]) >= 64
  with pytest.raises(ValueError, match="'train' or 'eval'"):
    image_data.embedded_photos("test")


@pytest.mark.parametrize("crop", ["center", "random", "random_scale"])
def test_preprocess_shape_and_range(crop):
  rng = np.random.default_rng(0)
  record = {"image": png_bytes(rng, 40, 70)}
  out = image_data.Preprocess(16, crop=crop, flip=True)(record, rng)
  assert out["image"].shape == (16, 16, 3)
  assert out["image"].dtype == np.float32
  assert -1.0 <= out["image"].min() and out["image"].max() <= 1.0
  assert not out["corrupt"]


def test_center_crop_is_exact_on_a_square_image():
  image = np.arange(16 * 16 * 3, dtype=np.uint8).reshape(16, 16, 3)
  out = image_data.Preprocess(16, crop="center")({"image": image}, None)
  np.testing.assert_allclose(out["image"], image / 127.5 - 1.0, atol=1e-6)


def test_corrupt_records_are_skipped_and_counted():
  rng = np.random.default_rng(0)
  good = [{"image": png_bytes(rng)} for _ in range(6)]
  bad = [{"image": b"\x89PNG not really"}, {"image": b""}]
  records = [good[0], bad[0], good[1], good[2], bad[1], good[3], good[4],
             good[5]]
  ds = image_data.image_pipeline(records, preprocess=image_data.Preprocess(8),
                           batch_size=2, seed=0, train=False)
  batches = list(ds)
  assert len(batches) == 3  # 6 good images in batches of 2
  assert sum(int(b["skipped"].sum()) for b in batches) == 2
  for b in batches:
    assert b["image"].shape == (2, 8, 8, 3)


def test_train_stream_is_deterministic_and_resumable():
  config = tiny_config()
  it = iter(image_data.train_dataset(config))
  next(it)
  state = it.get_state()
  want = next(it)["image"]
  again = iter(image_data.train_dataset(config))
  again.set_state(state)
  np.testing.assert_array_equal(next(again)["image"], want)


def test_eval_set_is_fixed():
  config = tiny_config()
  a = [b["image"] for b in image_data.eval_dataset(config)]
  b = [b["image"] for b in image_data.eval_dataset(config)]
  assert len(a) == 2
  for x, y in zip(a, b, strict=True):
    np.testing.assert_array_equal(x, y)


def test_batch_must_split_over_processes(monkeypatch):
  monkeypatch.setattr(jax, "process_count", lambda: 3)
  with pytest.raises(ValueError, match="not divisible by the 3 JAX processes"):
    image_data.image_pipeline([], preprocess=image_data.Preprocess(8),
                              batch_size=8, seed=0, train=False)


def test_unknown_dataset_name():
  config = tiny_config()
  config.data.name = "cifar"
  with pytest.raises(ValueError, match="'embedded', 'imagenet2012' or"
                     " 'fashion_mnist', got 'cifar'"):
    image_data.train_dataset(config)


def test_imagenet_needs_a_local_dir():
  config = tiny_config()
  config.data.name = "imagenet2012"
  config.data.data_dir = ""
  with pytest.raises(ValueError, match="local TFDS directory"):
    image_data.train_dataset(config)


def test_imagenet_pipeline_under_tfds_mock():
  tfds = pytest.importorskip("tensorflow_datasets")
  config = tiny_config()
  config.data.name = "imagenet2012"
  config.data.data_dir = "/nonexistent"  # mock_data never reads it
  with tfds.testing.mock_data(num_examples=20,
                              policy=tfds.testing.MockPolicy.USE_CODE):
    batch = next(iter(image_data.train_dataset(config)))
    evals = list(image_data.eval_dataset(config))
  assert batch["image"].shape == (8, 16, 16, 3)
  assert -1.0 <= batch["image"].min() and batch["image"].max() <= 1.0
  assert batch["image"].std() > 0.1  # real decoded pixels, not a fill
  assert len(evals) == 2  # 16 eval images in batches of 8


def test_processes_read_disjoint_shares(monkeypatch):
  rng = np.random.default_rng(0)
  records = [{"image": rng.integers(0, 256, (8, 8, 3), np.uint8)}
             for _ in range(12)]

  def images(index, count):
    monkeypatch.setattr(jax, "process_index", lambda: index)
    monkeypatch.setattr(jax, "process_count", lambda: count)
    ds = image_data.image_pipeline(records, preprocess=image_data.Preprocess(8),
                             batch_size=4, seed=0, train=False)
    return {x.tobytes() for b in ds for x in b["image"]}

  shares = [images(i, 2) for i in range(2)]
  assert len(shares[0]) == len(shares[1]) == 6
  assert not shares[0] & shares[1]
  assert shares[0] | shares[1] == images(0, 1)


def _id_batches(records, *, processes, start, steps, batch_size=6):
  """The global batches (example ids in device order) of `steps` steps of
  a training pipeline on `processes` processes, from global example
  `start`; each id carries the random draw its transform made."""
  def transform(record, rng):
    return {"id": np.int64(record["id"]), "draw": np.float64(rng.random()),
            "corrupt": False}

  iters = [iter(image_data.records_pipeline(
      records, transform, batch_size=batch_size, seed=7, train=True,
      start_example=start, process_index=p, process_count=processes,
      num_threads=1)) for p in range(processes)]
  out = []
  for _ in range(steps):
    parts = [next(it) for it in iters]  # process 0's block first
    out.append([(int(i), float(d)) for part in parts
                for i, d in zip(part["id"], part["draw"], strict=True)])
  return out


def test_elastic_resume_sees_each_example_once_on_any_process_count():
  """The documented data semantics (cvqcar.loop): global batch t holds
  examples start + t*B .. + B of one stream, the same on any process
  count, so a run stopped after s steps on P processes and resumed at
  example s*B on P' sees exactly what one uninterrupted run sees: no
  example twice, none skipped, with the same augmentation draw."""
  records = [{"id": i} for i in range(30)]  # 5 global batches an epoch
  whole = _id_batches(records, processes=1, start=0, steps=5)
  ids = [i for batch in whole for i, _ in batch]
  assert sorted(ids) == list(range(30))  # one epoch: each record once
  first = _id_batches(records, processes=2, start=0, steps=2)
  then = _id_batches(records, processes=3, start=2 * 6, steps=2)
  last = _id_batches(records, processes=1, start=4 * 6, steps=1)
  assert first + then + last == whole
  # Process 1 of 3 reads the second third of every global batch.
  local = next(iter(image_data.records_pipeline(
      records, lambda r, rng: {"id": r["id"], "corrupt": False},
      batch_size=6, seed=7, train=True, process_index=1, process_count=3,
      num_threads=1)))
  assert list(local["id"]) == [i for i, _ in whole[0][2:4]]


def _reference_preprocess(pre, image, rng):
  """The plain form of image_data.Preprocess: decode the whole image,
  resize it (or the crop) with PIL, cut the window, flip."""
  from PIL import Image as PILImage

  image = np.asarray(PILImage.open(io.BytesIO(image)).convert("RGB"))
  resize = lambda x, size: np.asarray(PILImage.fromarray(x).resize(
      size, PILImage.Resampling.BICUBIC, reducing_gap=2.0))
  r, (h, w) = pre.resolution, image.shape[:2]
  if pre.crop == "random_scale":
    short = min(h, w)
    side = int(rng.uniform(max(pre.min_scale * short, min(r, short)),
                           short + 1))
    top, left = rng.integers(0, h - side + 1), rng.integers(0, w - side + 1)
    out = resize(image[top:top + side, left:left + side], (r, r))
  else:
    scale = r / min(h, w)
    nh, nw = max(r, round(h * scale)), max(r, round(w * scale))
    image = resize(image, (nw, nh))
    if pre.crop == "random":
      top, left = rng.integers(0, nh - r + 1), rng.integers(0, nw - r + 1)
    else:
      top, left = (nh - r) // 2, (nw - r) // 2
    out = image[top:top + r, left:left + r]
  if pre.flip and rng.random() < 0.5:
    out = out[:, ::-1]
  return out.astype(np.float32) / 127.5 - 1.0


@pytest.mark.parametrize("crop", ["center", "random", "random_scale"])
@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_one_step_crop_resize_matches_decode_resize_then_crop(crop, fmt):
  """Preprocess resizes only the crop, in one resample, and decodes a
  JPEG at a reduced DCT scale when it shrinks 2x or more: the same images
  as decoding everything, resizing, then cropping, within JPEG noise."""
  from PIL import Image as PILImage

  photos = image_data.embedded_photos("train")
  pre = image_data.Preprocess(64, crop=crop, flip=True, min_scale=0.15)
  for i, photo in enumerate(photos[:6]):
    buf = io.BytesIO()
    PILImage.fromarray(photo["image"]).save(buf, fmt, quality=95)
    data = buf.getvalue()
    got = pre({"image": data}, np.random.default_rng(i))["image"]
    want = _reference_preprocess(pre, data, np.random.default_rng(i))
    assert got.shape == want.shape == (64, 64, 3)
    err = np.abs(got - want) * 127.5  # in 8-bit levels
    assert err.mean() < 1.5 and np.median(err) <= 1.0, (photo["name"],
                                                        err.mean())
  if fmt == "JPEG":  # a 512 px side shrinks 8x: decoded at 1/4 scale
    big = max(photos, key=lambda p: min(p["image"].shape[:2]))["image"]
    buf = io.BytesIO()
    PILImage.fromarray(big).save(buf, "JPEG")
    pil = PILImage.open(buf)
    w, h = pil.size
    assert w >= 512
    image_data._crop_resize(pil, (0, 0, w, h), w // 8)
    assert pil.size == (-(-w // 4), -(-h // 4))


def test_epoch_shuffle_visits_every_record_once_an_epoch_and_pickles():
  import pickle

  import grain

  ds = image_data.EpochShuffle(grain.MapDataset.range(50), seed=3)
  epochs = [[ds[e * 50 + i] for i in range(50)] for e in range(3)]
  for order in epochs:
    assert sorted(order) == list(range(50))
  assert epochs[0] != epochs[1] != epochs[2]
  again = pickle.loads(pickle.dumps(ds))  # a Grain worker's copy
  assert [again[60 + i] for i in range(10)] == epochs[1][10:20]
  assert image_data.EpochShuffle(grain.MapDataset.range(50), seed=4)[
      :50].to_iter_dataset() is not None
  other = [image_data.EpochShuffle(grain.MapDataset.range(50), seed=4)[i]
           for i in range(50)]
  assert other != epochs[0]


@pytest.mark.parametrize("train", [False, True])
def test_processes_draw_different_crops_of_the_same_image(train, monkeypatch):
  """Every example's random crop is seeded by its global index: two
  processes cropping the same image draw different crops, the ones one
  process would draw for those examples."""
  image = np.random.default_rng(0).integers(0, 256, (40, 50, 3), np.uint8)
  records = [{"image": image}]
  pre = image_data.Preprocess(8, crop="random_scale", min_scale=0.2)

  def crops(index, count):
    ds = image_data.records_pipeline(
        records, pre, batch_size=4, seed=0, train=train, num_examples=4,
        process_index=index, process_count=count, num_threads=1)
    return [x.tobytes() for x in next(iter(ds))["image"]]

  first, second = crops(0, 2), crops(1, 2)
  assert len(set(first + second)) == 4  # no crop drawn twice
  one = crops(0, 1)
  if train:  # contiguous blocks of each global batch
    assert first + second == one
  else:  # eval splits the examples p::P
    assert first == one[0::2] and second == one[1::2]


def test_prefetch_buffer_follows_the_local_batch(monkeypatch):
  import grain

  real, seen = grain.ReadOptions, []
  monkeypatch.setattr(grain, "ReadOptions",
                      lambda **kw: seen.append(kw) or real(**kw))
  image_data.records_pipeline([{"image": 0}], lambda r, rng: r, batch_size=8,
                              seed=0, train=True, process_index=0,
                              process_count=4)
  assert seen[-1]["prefetch_buffer_size"] == 2 * 2  # 2 x 8 / 4 processes
