"""Image grids of inputs and their (coarse-to-fine) reconstructions."""

from __future__ import annotations

import io

import numpy as np
from etils import epath
from PIL import Image


def to_uint8(images: np.ndarray) -> np.ndarray:
  """[-1, 1] floats -> uint8."""
  return np.clip((np.asarray(images) + 1.0) * 127.5 + 0.5, 0, 255).astype(
      np.uint8)


def reconstruction_grid(batch: dict[str, np.ndarray], max_rows: int = 8,
                        min_tile: int = 96, gap: int = 2) -> np.ndarray:
  """One row per image: input, then decodes from the first k channel tokens
  for growing k (channel-wise) or the reconstruction (patch-wise).

  Tiles are upscaled (nearest) to at least `min_tile` pixels.
  """
  prefixes = sorted((k for k in batch if k.startswith("prefix_")),
                    key=lambda k: int(k.split("_")[1]))
  columns = ["image"] + (prefixes or ["reconstructions"])
  rows = min(max_rows, batch["image"].shape[0])
  tiles = np.stack([np.asarray(batch[c][:rows]) for c in columns], axis=1)
  return strip_grid(tiles, min_tile, gap)


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


def strip_grid(rows: np.ndarray, min_tile: int = 96, gap: int = 2
               ) -> np.ndarray:
  """[R, N, H, W, 3] in [-1, 1] -> an R x N grid of upscaled tiles."""
  r, n, size = rows.shape[0], rows.shape[1], rows.shape[2]
  scale = max(1, -(-min_tile // size))
  tile = size * scale
  grid = np.full((r * (tile + gap) - gap, n * (tile + gap) - gap, 3), 255,
                 np.uint8)
  for i in range(r):
    for j in range(n):
      y, x = i * (tile + gap), j * (tile + gap)
      grid[y:y + tile, x:x + tile] = to_uint8(rows[i, j]).repeat(
          scale, 0).repeat(scale, 1)
  return grid
