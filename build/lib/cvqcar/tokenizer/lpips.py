"""LPIPS perceptual distance (VGG16 trunk) with weights read from a local .npz.

File layout (float32 arrays): `conv{i}/kernel` [3, 3, in, out] (HWIO) and
`conv{i}/bias` [out] for the 13 VGG16 convs i = 0..12, and `lin{j}` [C_j] for
the 5 non-negative channel weights of LPIPS v0.1. Nothing is downloaded: the
file is converted once from the published PyTorch weights (`from_torch`,
`python -m cvqcar.convert_weights --lpips=...`) and passed by path.

It computes in float32 with every convolution at `Precision.HIGHEST` (the
default is one bf16 pass on TPU, TF32 on recent NVIDIA GPUs), so a score
reads the same on every machine; the perceptual loss shares it.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

# VGG16 conv widths; 'M' is a 2x2 max-pool. LPIPS taps relu1_2, relu2_2,
# relu3_3, relu4_3 and relu5_3 (the last conv before each pool, and the end).
_VGG16 = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M",
          512, 512, 512)
_TAPS = (1, 3, 6, 9, 12)  # conv indices whose ReLU output is compared
_SHIFT = np.array([-0.030, -0.088, -0.188], np.float32)
_SCALE = np.array([0.458, 0.448, 0.450], np.float32)
_HIGHEST = jax.lax.Precision.HIGHEST


def _unit(f):
  """f / (||f|| + 1e-10) over channels, exactly as the lpips package."""
  return f / (jnp.sqrt(jnp.sum(f * f, -1, keepdims=True)) + 1e-10)


class LPIPS(nnx.Module):
  """d(x, y) per image for x, y in [-1, 1], [B, H, W, 3] -> [B]."""

  def __init__(self, *, precision=_HIGHEST, rngs: nnx.Rngs):
    """precision: HIGHEST for the metric; None (the backend's default) is
    enough for a training loss, where a pass of bf16 costs nothing."""
    convs, cin = [], 3
    for width in _VGG16:
      if width != "M":
        convs.append(nnx.Conv(cin, width, (3, 3), padding="SAME",
                              precision=precision, rngs=rngs))
        cin = width
    self.convs = nnx.List(convs)
    tap_widths = [convs[i].out_features for i in _TAPS]
    self.lins = nnx.List([
        nnx.Param(jnp.abs(jax.random.normal(rngs.params(), (c,))) / c)
        for c in tap_widths])

  def _features(self, x):
    h = (x.astype(jnp.float32) - _SHIFT) / _SCALE
    feats, conv_index = [], 0
    for width in _VGG16:
      if width == "M":
        h = nnx.max_pool(h, (2, 2), strides=(2, 2))
        continue
      h = nnx.relu(self.convs[conv_index](h))
      if conv_index in _TAPS:
        feats.append(h)
      conv_index += 1
    return feats

  def __call__(self, x, y):
    total = 0.0
    for fx, fy, lin in zip(self._features(x), self._features(y), self.lins,
                              strict=True):
      fx, fy = _unit(fx), _unit(fy)
      total = total + jnp.mean(jnp.sum(jnp.square(fx - fy) * lin[...], -1),
                               axis=(1, 2))
    return total

  def weights(self) -> dict[str, np.ndarray]:
    out = {}
    for i, conv in enumerate(self.convs):
      out[f"conv{i}/kernel"] = np.asarray(conv.kernel[...])
      out[f"conv{i}/bias"] = np.asarray(conv.bias[...])
    for j, lin in enumerate(self.lins):
      out[f"lin{j}"] = np.asarray(lin[...])
    return out

  def save(self, path: str) -> None:
    with open(path, "wb") as f:
      np.savez(f, **self.weights())


def load(path: str, precision=_HIGHEST) -> LPIPS:
  """Builds LPIPS (convolutions at `precision`, see LPIPS) and fills it
  from `path`; errors name missing/odd arrays."""
  if not os.path.exists(path):
    raise FileNotFoundError(
        f"LPIPS weights {path!r} not found (config.loss.perceptual_weights)")
  model = LPIPS(precision=precision, rngs=nnx.Rngs(0))
  expected = model.weights()
  with np.load(path) as f:
    stored = dict(f)
  missing = sorted(set(expected) - set(stored))
  if missing:
    raise ValueError(f"LPIPS weights {path!r} lack {missing[:4]}...")
  for name, value in expected.items():
    if stored[name].shape != value.shape:
      raise ValueError(f"LPIPS weights {path!r}: {name} has shape"
                       f" {stored[name].shape}, expected {value.shape}")
  for i, conv in enumerate(model.convs):
    conv.kernel[...] = jnp.asarray(stored[f"conv{i}/kernel"])
    conv.bias[...] = jnp.asarray(stored[f"conv{i}/bias"])
  for j, lin in enumerate(model.lins):
    lin[...] = jnp.asarray(stored[f"lin{j}"])
  return model


def from_torch(state: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
  """Our .npz layout from PyTorch state dicts (merged): the VGG16 trunk as
  torchvision's `features.N.weight` or the lpips package's
  `net.sliceK.N.weight`, and the lpips linear layers `linJ.model.1.weight`
  (the package's weights/v0.1/vgg.pth)."""
  convs = {}
  for key, value in state.items():
    m = re.fullmatch(r"(?:features|net\.slice\d)\.(\d+)\.(weight|bias)",
                     key)
    if m:
      convs.setdefault(int(m.group(1)), {})[m.group(2)] = np.asarray(value)
  lins = {int(m.group(1)): np.asarray(v) for k, v in state.items()
          if (m := re.fullmatch(r"lin(\d)\.model\.\d\.weight", k))}
  if len(convs) != 13 or sorted(lins) != list(range(5)):
    raise ValueError(f"expected 13 VGG16 convs and lin0..lin4, found"
                     f" {len(convs)} convs and lins {sorted(lins)}")
  out = {}
  for i, index in enumerate(sorted(convs)):
    w = convs[index]["weight"]  # [out, in, 3, 3]
    out[f"conv{i}/kernel"] = w.transpose(2, 3, 1, 0).astype(np.float32)
    out[f"conv{i}/bias"] = convs[index]["bias"].astype(np.float32)
  for j in range(5):
    out[f"lin{j}"] = lins[j].reshape(-1).astype(np.float32)
  return out
