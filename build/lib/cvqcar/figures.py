"""Figures of tokenizers, for the notebooks and the README.

Each function draws one matplotlib figure and returns it; `save` writes a
figure as a PNG file. The notebooks only call these, so their cells hold no
logic. Images are [N, H, W, 3] in [-1, 1]; a tokenizer is an exported
`cvqcar.tokenizer.model.Tokenizer` (channel or patch tokens). CAR's
figures are in cvqcar.car.figures.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np

from cvqcar import metrics, visualize


def runtime() -> str:
  """What JAX runs on, best first (TPU, else GPU, else CPU): its default
  backend is already that choice."""
  devices = jax.devices()
  return (f"{len(devices)} x {devices[0].device_kind}"
          f" ({jax.default_backend()}), jax {jax.__version__}")


def save(fig, path: str) -> str:
  """Writes `fig` to `path` (PNG) and returns the path."""
  os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
  fig.savefig(path, dpi=100, bbox_inches="tight")
  return path


def _tiles(ax, image, title: str = "", cmap=None) -> None:
  ax.imshow(image, cmap=cmap, interpolation="nearest")
  ax.set_title(title, fontsize=9)
  ax.axis("off")


def image_grid(rows: np.ndarray, column_titles: Sequence[str],
               row_titles: Sequence[str] = (), tile: float = 1.6):
  """[R, N, H, W, 3] in [-1, 1] -> a labelled R x N grid."""
  r, n = rows.shape[:2]
  fig, axes = plt.subplots(r, n, figsize=(tile * n, tile * r + 0.3),
                           squeeze=False)
  for i in range(r):
    for j in range(n):
      _tiles(axes[i, j], visualize.to_uint8(rows[i, j]),
             column_titles[j] if i == 0 else "")
    if i < len(row_titles):
      axes[i, 0].text(-0.08, 0.5, row_titles[i], transform=axes[i, 0].transAxes,
                      ha="right", va="center", fontsize=9, wrap=True)
  fig.tight_layout()
  return fig


def prefix_decodes(tokenizer, images, ks: Sequence[int]) -> np.ndarray:
  """[N, len(ks), H, W, 3]: the decodes from the first k channel tokens."""
  tokens = jax.jit(tokenizer.encode)(jnp.asarray(images))
  return prefix_decodes_of_tokens(tokenizer, tokens, ks)


def default_ks(num_channels: int) -> list[int]:
  return metrics.prefix_lengths(num_channels)


def reconstructions(tokenizer, images, ks: Sequence[int] | None = None):
  """A row per image: the input, then its decodes from the first k channel
  tokens (patch tokens: the reconstruction)."""
  if tokenizer.quantize == "channel":
    ks = list(ks or default_ks(tokenizer.latent_channels))
    decodes = prefix_decodes(tokenizer, images, ks)
    titles = ["input"] + [f"{k} channels" for k in ks]
  else:
    decodes = np.asarray(jax.jit(lambda x: tokenizer(x).reconstructions)(
        jnp.asarray(images)))[:, None]
    titles = ["input", f"{tokenizer.num_tokens} patch tokens"]
  rows = np.concatenate([np.asarray(images)[:, None], decodes], axis=1)
  return image_grid(rows, titles)


def coarse_to_fine(tokenizer, image, steps: int = 8):
  """One image decoded from 1, 2, ... C channel tokens (`steps` columns,
  log-spaced), with the PSNR of each decode."""
  c = tokenizer.latent_channels
  ks = sorted({int(round(k)) for k in np.geomspace(1, c, steps)})
  image = np.asarray(image)[None]
  decodes = prefix_decodes(tokenizer, image, ks)[0]
  psnr = [float(metrics.psnr(d[None], image)[0]) for d in decodes]
  fig, axes = plt.subplots(1, len(ks) + 1, figsize=(1.6 * (len(ks) + 1), 2))
  _tiles(axes[0], visualize.to_uint8(image[0]), "input")
  for ax, k, d, p in zip(axes[1:], ks, decodes, psnr, strict=True):
    _tiles(ax, visualize.to_uint8(d), f"{k} ch\n{p:.1f} dB")
  fig.tight_layout()
  return fig


def code_counts(tokenizer, images) -> np.ndarray:
  """How often each of the K codes is used by the images' tokens."""
  tokens = np.asarray(jax.jit(tokenizer.encode)(jnp.asarray(images)))
  return np.bincount(tokens.ravel(), minlength=tokenizer.num_codes)


def usage_histogram(tokenizers: dict, images):
  """Code frequencies, most used first (log scale), one line per named
  tokenizer, with the share of codes used in the legend."""
  fig, ax = plt.subplots(figsize=(6, 3.2))
  for name, tok in tokenizers.items():
    counts = np.sort(code_counts(tok, images))[::-1]
    used = np.count_nonzero(counts) / counts.size
    ax.plot(np.arange(1, counts.size + 1), np.maximum(counts, 0.5),
            label=f"{name}: {used:.0%} of {counts.size} codes used")
  ax.set_xscale("log")
  ax.set_yscale("log")
  ax.set_xlabel("code rank")
  ax.set_ylabel("uses")
  ax.legend(fontsize=8)
  fig.tight_layout()
  return fig


def psnr_vs_channels(tokenizers: dict, images, ks=None):
  """PSNR of the decode from the first k channel tokens against k, one line
  per named tokenizer (e.g. with and without nested dropout)."""
  fig, ax = plt.subplots(figsize=(5, 3.2))
  images = np.asarray(images)
  for name, tok in tokenizers.items():
    kk = list(ks or default_ks(tok.latent_channels))
    decodes = prefix_decodes(tok, images, kk)
    psnr = [float(jnp.mean(metrics.psnr(decodes[:, i], images)))
            for i in range(len(kk))]
    ax.plot(kk, psnr, marker="o", label=name)
  ax.set_xscale("log", base=2)
  ax.set_xlabel("channels kept (first k)")
  ax.set_ylabel("PSNR (dB)")
  ax.legend(fontsize=8)
  fig.tight_layout()
  return fig


def channel_energy(tokenizer, images):
  """Per channel index: the mean squared value of its quantized map (bars)
  and the PSNR gained by adding it to the first k - 1 (line): with nested
  dropout the early channels carry most of the image."""
  images = jnp.asarray(images)
  c = tokenizer.latent_channels
  tokens = jax.jit(tokenizer.encode)(images)
  maps_bhwc = np.asarray(tokenizer.quantizer.lookup(tokens, c))
  energy = (maps_bhwc ** 2).mean(axis=(0, 1, 2))
  decodes = prefix_decodes(tokenizer, images, range(1, c + 1))
  psnr = np.array([float(jnp.mean(metrics.psnr(decodes[:, i], images)))
                   for i in range(c)])
  fig, ax = plt.subplots(figsize=(6, 3.2))
  ax.bar(np.arange(1, c + 1), energy, color="tab:gray")
  ax.set_xlabel("channel")
  ax.set_ylabel("mean squared codeword value")
  twin = ax.twinx()
  twin.plot(np.arange(1, c + 1), np.diff(psnr, prepend=psnr[0]),
            color="tab:red", marker=".")
  twin.set_ylabel("PSNR gain from this channel (dB)", color="tab:red")
  fig.tight_layout()
  return fig


def nearest_codewords(tokenizer, image, channel: int = 0, n: int = 7):
  """A channel map of one image, then the n codewords nearest to it
  (squared L2, the first being its token), each as an h x w picture."""
  z = np.asarray(jax.jit(tokenizer.encoder)(jnp.asarray(image)[None]))[0]
  h, w, c = z.shape
  if not 0 <= channel < c:
    raise ValueError(f"channel {channel}; the tokenizer has {c}")
  target = z[..., channel].reshape(-1)
  codebook = np.asarray(tokenizer.quantizer.vq.codebook())
  dist = ((codebook - target) ** 2).sum(axis=1)
  order = np.argsort(dist)[:n]
  fig, axes = plt.subplots(1, n + 1, figsize=(1.4 * (n + 1), 1.9))
  _tiles(axes[0], target.reshape(h, w), f"channel {channel}", "gray")
  for ax, k in zip(axes[1:], order, strict=True):
    _tiles(ax, codebook[k].reshape(h, w), f"code {k}\nd={dist[k]:.2f}",
           "gray")
  fig.tight_layout()
  return fig


def loss_curve(history: dict[int, dict[str, float]], key: str = "train/loss"):
  """A metric against the training step, from a trainer Summary's train
  dict or `logs.read_metrics`."""
  steps = sorted(s for s in history if key in history[s])
  fig, ax = plt.subplots(figsize=(5, 3))
  ax.plot(steps, [history[s][key] for s in steps])
  ax.set_xlabel("step")
  ax.set_ylabel(key)
  fig.tight_layout()
  return fig


class LiveProgress:
  """Pass as a trainer's `on_log`: a progress line and the loss curve,
  redrawn in place in a notebook (plain lines elsewhere)."""

  def __init__(self, key: str = "train/loss"):
    self.key, self.history, self._handle = key, {}, None

  def __call__(self, step: int, total: int, scalars: dict[str, float]):
    if self.key not in scalars:
      return
    self.history[step] = dict(scalars)
    done = int(30 * step / max(total, 1))
    line = (f"[{'#' * done}{'.' * (30 - done)}] step {step}/{total}"
            f" {self.key} {scalars[self.key]:.4f}")
    try:
      from IPython import display, get_ipython  # noqa: PLC0415
    except ImportError:
      get_ipython = lambda: None  # noqa: E731
    if get_ipython() is None:
      print(line, flush=True)
      return
    fig = loss_curve(self.history, self.key)
    fig.suptitle(line, fontsize=8)
    if self._handle is None:
      self._handle = display.display(fig, display_id=True)
    else:
      self._handle.update(fig)
    plt.close(fig)


def prefix_decodes_of_tokens(tokenizer, tokens_bc, ks) -> np.ndarray:
  """[B, len(ks), H, W, 3]: decodes of the first k of given channel tokens
  (residual VQ: of the first k channels' codes)."""
  decode = jax.jit(tokenizer.decode)
  tokens_bc = jnp.asarray(tokens_bc)
  per = tokenizer.codes_per_token
  return np.stack([np.asarray(decode(tokens_bc[:, :k * per])) for k in ks],
                  1)
