"""Image decoding: bit depths, colour modes, transparency, EXIF rotation,
tiny and extreme-aspect images, through decode_image and Preprocess."""

import io

import numpy as np
import pytest
from PIL import Image

from cvqcar.data import images as image_data

ORIENTATION = 0x0112  # the EXIF tag


def encode(pil, fmt="PNG", **kwargs):
  buf = io.BytesIO()
  pil.save(buf, fmt, **kwargs)
  return buf.getvalue()


def both_paths(data):
  """uint8 [H, W, 3] of `data` from decode_image and from Preprocess's
  crop path (a center crop of a square image at its own size is the
  image itself), which must agree."""
  decoded = image_data.decode_image(data)
  side = decoded.shape[0]
  assert decoded.shape == (side, side, 3) and decoded.dtype == np.uint8
  out = image_data.Preprocess(side, crop="center")({"image": data}, None)
  assert not out["corrupt"]
  np.testing.assert_array_equal(
      np.rint((out["image"] + 1.0) * 127.5).astype(np.uint8), decoded)
  return decoded


def on_white(rgb, alpha):
  a = alpha[..., None].astype(np.float64) / 255.0
  return rgb * a + 255.0 * (1.0 - a)


def test_16_bit_grey_is_scaled_not_clipped():
  levels = np.linspace(0, 65535, 12 * 12).reshape(12, 12).astype(np.uint16)
  data = encode(Image.fromarray(levels))
  assert Image.open(io.BytesIO(data)).mode.startswith("I")
  got = both_paths(data)
  np.testing.assert_array_equal(
      got, np.repeat(np.rint(levels / 257.0)[..., None], 3, -1))
  array = image_data.decode_image(levels)  # a uint16 array: the same scale
  np.testing.assert_array_equal(array, got)


def test_rgba_and_la_are_composited_on_white():
  rng = np.random.default_rng(0)
  rgb = rng.integers(0, 256, (10, 10, 3), np.uint8)
  alpha = rng.integers(0, 256, (10, 10), np.uint8)
  alpha[0], alpha[1] = 0, 255  # fully transparent, fully opaque rows
  want = on_white(rgb, alpha)
  got = both_paths(encode(Image.fromarray(np.dstack([rgb, alpha]), "RGBA")))
  np.testing.assert_allclose(got, want, atol=1)
  np.testing.assert_array_equal(got[0], 255)
  np.testing.assert_array_equal(got[1], rgb[1])
  array = image_data.decode_image(np.dstack([rgb, alpha]))
  np.testing.assert_allclose(array, want, atol=1)
  grey = rgb[..., 0]
  got = both_paths(encode(Image.fromarray(np.dstack([grey, alpha]), "LA")))
  np.testing.assert_allclose(got, on_white(np.dstack([grey] * 3), alpha),
                             atol=1)


def test_palette_with_a_transparent_entry_shows_white():
  index = np.arange(64, dtype=np.uint8).reshape(8, 8) % 4
  pil = Image.fromarray(index, "P")
  palette = [(200, 10, 10), (10, 200, 10), (10, 10, 200), (0, 0, 0)]
  pil.putpalette([c for rgb in palette for c in rgb])
  got = both_paths(encode(pil, transparency=3))  # entry 3 (black) hidden
  want = np.array(palette[:3] + [(255, 255, 255)], np.uint8)[index]
  np.testing.assert_array_equal(got, want)
  got = both_paths(encode(pil))  # no transparency: black stays black
  np.testing.assert_array_equal(got, np.array(palette, np.uint8)[index])


def test_grey_and_cmyk_decode_to_their_rgb():
  rng = np.random.default_rng(1)
  grey = rng.integers(0, 256, (9, 9), np.uint8)
  np.testing.assert_array_equal(
      both_paths(encode(Image.fromarray(grey))), np.dstack([grey] * 3))
  rgb = rng.integers(0, 256, (9, 9, 3), np.uint8)
  cmyk = Image.fromarray(rgb).convert("CMYK")
  data = encode(cmyk, "TIFF")
  assert Image.open(io.BytesIO(data)).mode == "CMYK"
  np.testing.assert_array_equal(both_paths(data), rgb)


@pytest.mark.parametrize("orientation,turn", [(3, 2), (6, -1), (8, 1)])
def test_exif_orientation_is_applied(orientation, turn):
  """Orientation 6 is stored turned 90 degrees counter-clockwise (shown
  after a clockwise turn), 8 the other way, 3 upside down."""
  rng = np.random.default_rng(2)
  upright = rng.integers(0, 256, (12, 20, 3), np.uint8)  # [H, W] shown
  stored = np.rot90(upright, -turn)
  exif = Image.Exif()
  exif[ORIENTATION] = orientation
  data = encode(Image.fromarray(np.ascontiguousarray(stored)), exif=exif)
  np.testing.assert_array_equal(image_data.decode_image(data), upright)
  pre = image_data.Preprocess(12, crop="center")
  got = pre({"image": data}, None)["image"]
  want = pre({"image": encode(Image.fromarray(upright))}, None)["image"]
  np.testing.assert_allclose(got, want, atol=1e-6)


def test_exif_rotated_jpeg_in_draft_mode_matches_the_upright_image():
  """A JPEG shrunk 8x is decoded at a reduced DCT scale before it is
  turned upright; the crop box must follow the turn."""
  y, x = np.mgrid[0:256, 0:512].astype(np.float64)
  upright = np.dstack([x / 2, y, 255 - x / 2]).astype(np.uint8)  # [256, 512]
  exif = Image.Exif()
  exif[ORIENTATION] = 6
  stored = Image.fromarray(np.ascontiguousarray(np.rot90(upright, 1)))
  data = encode(stored, "JPEG", quality=95, exif=exif)
  reference = encode(Image.fromarray(upright), "PNG")
  for crop in ("center", "random", "random_scale"):
    pre = image_data.Preprocess(32, crop=crop, min_scale=0.5)
    got = pre({"image": data}, np.random.default_rng(3))["image"]
    want = pre({"image": reference}, np.random.default_rng(3))["image"]
    assert np.abs(got - want).mean() * 127.5 < 2.0, crop


def test_images_under_the_minimum_size_are_skipped_and_counted():
  small = encode(Image.new("RGB", (40, 9), "red"))
  large = encode(Image.new("RGB", (40, 10), "red"))
  pre = image_data.Preprocess(8, min_size=10)
  assert pre({"image": small}, None) == {"corrupt": True}
  assert not pre({"image": large}, None)["corrupt"]
  batches = list(image_data.image_pipeline(
      [{"image": large}, {"image": small}, {"image": large}],
      preprocess=pre, batch_size=2, seed=0, train=False))
  assert len(batches) == 1 and int(batches[0]["skipped"].sum()) == 1


@pytest.mark.parametrize("crop", ["center", "random", "random_scale"])
@pytest.mark.parametrize("form", ["png", "array"])
def test_extreme_aspect_ratio_resizes_only_the_crop(crop, form, monkeypatch):
  """A 5000 x 1 strip becomes R x R without resizing the whole strip."""
  strip = np.random.default_rng(4).integers(0, 256, (1, 5000, 3), np.uint8)
  image = encode(Image.fromarray(strip)) if form == "png" else strip
  sizes, resize = [], Image.Image.resize

  def recording_resize(self, size, *args, **kwargs):
    sizes.append(tuple(size))
    return resize(self, size, *args, **kwargs)

  monkeypatch.setattr(Image.Image, "resize", recording_resize)
  out = image_data.Preprocess(16, crop=crop)({"image": image},
                                             np.random.default_rng(0))
  assert out["image"].shape == (16, 16, 3)
  assert sizes == [(16, 16)]
