"""Image grids of inputs and their (coarse-to-fine) reconstructions."""

from __future__ import annotations

import os

import numpy as np
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
  size = batch["image"].shape[1]
  scale = max(1, -(-min_tile // size))
  tile = size * scale
  grid = np.full((rows * (tile + gap) - gap,
                  len(columns) * (tile + gap) - gap, 3), 255, np.uint8)
  for r in range(rows):
    for c, name in enumerate(columns):
      img = to_uint8(batch[name][r]).repeat(scale, 0).repeat(scale, 1)
      y, x = r * (tile + gap), c * (tile + gap)
      grid[y:y + tile, x:x + tile] = img
  return grid


def save_png(image: np.ndarray, path: str) -> str:
  os.makedirs(os.path.dirname(path), exist_ok=True)
  Image.fromarray(image).save(path)
  return path
