"""Image grids of inputs and their (coarse-to-fine) reconstructions."""

from __future__ import annotations

import io
from collections.abc import Sequence

import numpy as np
from etils import epath
from PIL import Image, ImageDraw, ImageFont


def to_uint8(images: np.ndarray) -> np.ndarray:
  """[-1, 1] floats -> uint8."""
  return np.clip((np.asarray(images) + 1.0) * 127.5 + 0.5, 0, 255).astype(
      np.uint8)


def reconstruction_grid(batch: dict[str, np.ndarray], max_rows: int = 8,
                        min_tile: int = 96, gap: int = 2) -> np.ndarray:
  """One row per image: input, then decodes from the first k channel tokens
  for growing k (channel-wise) or the reconstruction (patch-wise), under a
  row of column titles ('input', 'first k').

  Tiles are upscaled (nearest) to at least `min_tile` pixels.
  """
  prefixes = sorted((k for k in batch if k.startswith("prefix_")),
                    key=lambda k: int(k.split("_")[1]))
  columns = ["image"] + (prefixes or ["reconstructions"])
  rows = min(max_rows, batch["image"].shape[0])
  tiles = np.stack([np.asarray(batch[c][:rows]) for c in columns], axis=1)
  ks = [int(c.split("_")[1]) for c in prefixes]
  titles = ["input"] + (prefix_titles(ks) if ks else ["decoded"])
  return strip_grid(tiles, min_tile, gap, column_titles=titles)


def prefix_titles(ks: Sequence[int]) -> list[str]:
  """Column titles of decodes from the first k of C = max(ks) tokens."""
  return [f"first {k}" for k in ks[:-1]] + [f"all {ks[-1]}"]


def save_png(image: np.ndarray, path: str) -> str:
  """Writes a uint8 image; `path` may be local or a cloud path (gs://...)."""
  out = epath.Path(path)
  out.parent.mkdir(parents=True, exist_ok=True)
  buffer = io.BytesIO()
  Image.fromarray(image).save(buffer, format="PNG")
  out.write_bytes(buffer.getvalue())
  return path


def strip(images: np.ndarray, min_tile: int = 96, gap: int = 2) -> np.ndarray:
  """[N, H, W, 3] in [-1, 1] -> one row of N upscaled tiles (uint8)."""
  return strip_grid(images[None], min_tile, gap)


def strip_grid(rows: np.ndarray, min_tile: int = 96, gap: int = 2,
               column_titles: Sequence[str] | None = None,
               row_titles: Sequence[str] | None = None) -> np.ndarray:
  """[R, N, H, W, 3] in [-1, 1] -> an R x N grid of upscaled tiles, with a
  band of column titles on top and of row titles on the left if given."""
  r, n, size = rows.shape[0], rows.shape[1], rows.shape[2]
  for titles, count, what in ((column_titles, n, "column"),
                              (row_titles, r, "row")):
    if titles is not None and len(titles) != count:
      raise ValueError(f"{len(titles)} {what} titles for {count} {what}s")
  scale = max(1, -(-min_tile // size))
  tile = size * scale
  font = _font()
  top = _LINE if column_titles is not None else 0
  left = 0
  if row_titles is not None:
    left = min(_MAX_ROW_TITLE, max(
        (_text_width(font, t) for t in row_titles), default=0) + 8)
  grid = np.full((top + r * (tile + gap) - gap,
                  left + n * (tile + gap) - gap, 3), 255, np.uint8)
  for i in range(r):
    for j in range(n):
      y, x = top + i * (tile + gap), left + j * (tile + gap)
      grid[y:y + tile, x:x + tile] = to_uint8(rows[i, j]).repeat(
          scale, 0).repeat(scale, 1)
  if column_titles is None and row_titles is None:
    return grid
  canvas = Image.fromarray(grid)
  draw = ImageDraw.Draw(canvas)
  for j, title in enumerate(column_titles or ()):
    text = _fit(font, title, tile)
    x = left + j * (tile + gap) + (tile - _text_width(font, text)) // 2
    _draw(draw, font, (x, top // 2), text)
  for i, title in enumerate(row_titles or ()):
    text = _fit(font, title, left - 8)
    y = top + i * (tile + gap) + tile // 2
    _draw(draw, font, (left - 4 - _text_width(font, text), y), text)
  return np.asarray(canvas)


_LINE = 20  # height of the column-title band, pixels
_MAX_ROW_TITLE = 260  # widest row-title band, pixels


def _font():
  try:  # Pillow >= 10.1: the bundled scalable font.
    return ImageFont.load_default(size=13)
  except TypeError:
    return ImageFont.load_default()


def _draw(draw, font, xy, text: str) -> None:
  """Text whose left edge is at x, vertically centred on y."""
  _, top, _, bottom = font.getbbox(text)
  draw.text((xy[0], xy[1] - (top + bottom) // 2), text, fill=(0, 0, 0),
            font=font)


def _text_width(font, text: str) -> int:
  left, _, right, _ = font.getbbox(text)
  return int(right - left)


def _fit(font, text: str, width: int) -> str:
  """`text`, cut with an ellipsis to fit `width` pixels."""
  if _text_width(font, text) <= width:
    return text
  while text and _text_width(font, text + "...") > width:
    text = text[:-1]
  return text + "..."
