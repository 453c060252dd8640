"""TFDS data as `tfds build` writes it (TFRecord): refused with the fix,
converted in place to ArrayRecord, then trained on."""

import math
import shutil

import numpy as np
import pytest

from conftest import tiny_config
from cvqcar.data import images as image_data
from cvqcar.data import tfds_images

tfds = pytest.importorskip("tensorflow_datasets")


class TinyPhotos(tfds.core.GeneratorBasedBuilder):
  """A handful of small random RGB images in 'train' and 'validation'."""

  VERSION = tfds.core.Version("1.0.0")

  def _info(self):
    return tfds.core.DatasetInfo(
        builder=self, features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(shape=(None, None, 3)),
            "label": tfds.features.ClassLabel(num_classes=2)}))

  def _split_generators(self, dl_manager):
    del dl_manager  # nothing to download
    return {"train": self._generate_examples(12, seed=0),
            "validation": self._generate_examples(8, seed=1)}

  def _generate_examples(self, n, seed):
    rng = np.random.default_rng(seed)
    for i in range(n):
      image = rng.integers(0, 256, (18 + i, 24, 3), np.uint8)
      yield i, {"image": image, "label": i % 2}


@pytest.fixture(scope="module")
def built_dir(tmp_path_factory):
  data_dir = tmp_path_factory.mktemp("tfds")
  builder = TinyPhotos(data_dir=str(data_dir))
  builder.download_and_prepare()
  assert builder.info.file_format.value == "tfrecord"  # tfds build's default
  return data_dir


@pytest.fixture
def tfrecord_dir(built_dir, tmp_path):
  """A copy of the TFRecord dataset each test may convert."""
  shutil.copytree(built_dir, tmp_path / "tfds")
  return str(tmp_path / "tfds")


def test_tfrecord_data_is_refused_with_the_fix_then_converted(tfrecord_dir):
  config = tiny_config()
  config.data.name = "imagenet2012"
  config.data.data_dir = tfrecord_dir
  config.data.tfds_name = "tiny_photos"
  with pytest.raises(ValueError, match="python -m cvqcar.data.tfds_images"
                     f" --data_dir={tfrecord_dir} --name=tiny_photos"):
    image_data.train_dataset(config)
  assert tfds_images.convert("tiny_photos", tfrecord_dir, num_workers=2) == 2
  assert tfds_images.convert("tiny_photos", tfrecord_dir) == 0  # done once
  train = tfds_images.source("tiny_photos", "train", tfrecord_dir)
  shapes = sorted(image_data.decode_image(train[i]["image"]).shape
                  for i in range(len(train)))
  assert shapes == [(18 + i, 24, 3) for i in range(12)]
  batch = next(iter(image_data.train_dataset(config)))
  assert batch["image"].shape == (8, 16, 16, 3)
  assert batch["image"].std() > 0.1  # decoded pixels, not a fill


@pytest.mark.slow
def test_tiny_config_trains_on_converted_tfrecord_data(tfrecord_dir,
                                                       tmp_path):
  from cvqcar.tokenizer import trainer as tokenizer_trainer

  tfds_images.convert("tiny_photos", tfrecord_dir)
  config = tiny_config()
  config.data.name = "imagenet2012"
  config.data.data_dir = tfrecord_dir
  config.data.tfds_name = "tiny_photos"
  config.data.num_eval_images = 8
  config.num_train_steps = 2
  summary = tokenizer_trainer.train_and_evaluate(config,
                                                 str(tmp_path / "run"))
  assert summary.last_step == 2
  assert all(math.isfinite(s["train/loss"]) for s in summary.train.values())
  assert summary.eval["eval/psnr"] > 0
