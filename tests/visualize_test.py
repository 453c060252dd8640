"""Image grids: tiles where they belong, titles drawn beside them."""

import numpy as np
import pytest

from cvqcar import visualize


def rows(r, n, size=8, seed=0):
  return np.random.RandomState(seed).uniform(-1, 1, (r, n, size, size, 3))


def test_tiles_are_the_upscaled_images_in_order():
  images = rows(2, 3)
  grid = visualize.strip_grid(images, min_tile=24, gap=2)
  tile = 24  # 8 px upscaled x3
  assert grid.shape == (2 * tile + 2, 3 * tile + 4, 3)
  for i in range(2):
    for j in range(3):
      y, x = i * (tile + 2), j * (tile + 2)
      np.testing.assert_array_equal(
          grid[y:y + tile:3, x:x + tile:3], visualize.to_uint8(images[i, j]))


def test_titles_add_bands_with_text_and_keep_the_tiles():
  images = rows(2, 3)
  plain = visualize.strip_grid(images, min_tile=24)
  titled = visualize.strip_grid(images, min_tile=24,
                                column_titles=["input", "first 2", "all 4"],
                                row_titles=["a cat", "a much longer prompt"])
  top = titled.shape[0] - plain.shape[0]
  left = titled.shape[1] - plain.shape[1]
  assert top > 10 and left > 10
  np.testing.assert_array_equal(titled[top:, left:], plain)
  # Text is drawn in both bands (dark pixels on white).
  assert (titled[:top, left:] < 128).any()
  assert (titled[top:, :left] < 128).any()


def test_long_row_titles_are_cut_to_the_band():
  images = rows(1, 2)
  titled = visualize.strip_grid(images, min_tile=24,
                                row_titles=["word " * 200])
  assert titled.shape[1] - 24 * 2 - 2 <= visualize._MAX_ROW_TITLE


def test_title_counts_must_match():
  with pytest.raises(ValueError, match="2 column titles for 3 columns"):
    visualize.strip_grid(rows(1, 3), column_titles=["a", "b"])


def test_reconstruction_grid_names_its_columns():
  assert visualize.prefix_titles([1, 2, 4]) == ["first 1", "first 2",
                                                "all 4"]
  images = rows(2, 1)[:, 0]
  batch = {"image": images, "prefix_4": images, "prefix_1": -images}
  grid = visualize.reconstruction_grid(batch, min_tile=24)
  plain = visualize.strip_grid(
      np.stack([images, -images, images], 1), min_tile=24)
  top = grid.shape[0] - plain.shape[0]
  assert top > 10 and grid.shape[1] == plain.shape[1]
  np.testing.assert_array_equal(grid[top:], plain)  # sorted by k
