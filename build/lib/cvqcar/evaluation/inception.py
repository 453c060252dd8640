"""The FID InceptionV3 (pool, spatial and logit features) in JAX, from
local weights.

This is the network every FID number in the literature comes from: the
TF-ported 2015-12-05 Inception weights (`pt_inception-2015-12-05-6726825d
.pth`, as published by pytorch-fid) with the FID variants of its blocks
(average pools that do not count padding; a max pool in the last block).
Inputs are resized to 299 x 299 bilinearly (no antialiasing, half-pixel
centres: torch's `interpolate(align_corners=False)`) and scaled to [-1, 1].

Weights are a flat dict keyed by the PyTorch state-dict names
(`Mixed_5b.branch1x1.conv.weight`, `... .bn.running_var`, ...), read from
the .pth (needs torch) or from an .npz written by `convert` (does not).
Batch norms are folded into the convolutions at load time. Nothing is ever
downloaded.

Besides the 2048-d pool features (FID, precision/recall), `outputs` gives
the two others the ADM evaluator (guided-diffusion's evaluations/) uses:
'spatial', the first 7 channels of Mixed_6d's 1x1 branch at 17 x 17
(flattened h, w, c: 2023 values; the TF graph's `mixed_6/conv`), for sFID;
and 'logits', pool features times the 1008-way classifier's weight without
its bias (the graph's `softmax/logits/MatMul`, torch-fidelity's
`logits_unbiased`), for the Inception Score.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np

FEATURES = 2048
SPATIAL_FEATURES = 17 * 17 * 7
LOGITS = 1008
_BN_EPS = 1e-3
_HIGHEST = jax.lax.Precision.HIGHEST

# (name, out channels, kernel (h, w), stride, padding (h, w)) of the stem.
_STEM = (("Conv2d_1a_3x3", (3, 3), 2, (0, 0)),
         ("Conv2d_2a_3x3", (3, 3), 1, (0, 0)),
         ("Conv2d_2b_3x3", (3, 3), 1, (1, 1)), "max",
         ("Conv2d_3b_1x1", (1, 1), 1, (0, 0)),
         ("Conv2d_4a_3x3", (3, 3), 1, (0, 0)), "max")


def fold_batch_norms(state: Mapping[str, np.ndarray]) -> dict:
  """{conv name: (HWIO kernel, bias)} with each batch norm folded in."""
  out = {}
  for key in state:
    if not key.endswith(".conv.weight"):
      continue
    name = key[:-len(".conv.weight")]
    w = np.asarray(state[key], np.float64)
    g, b, mean, var = (np.asarray(state[f"{name}.bn.{k}"], np.float64)
                       for k in ("weight", "bias", "running_mean",
                                 "running_var"))
    scale = g / np.sqrt(var + _BN_EPS)
    kernel = (w * scale[:, None, None, None]).transpose(2, 3, 1, 0)
    out[name] = (kernel.astype(np.float32),
                 (b - mean * scale).astype(np.float32))
  return out


def load(path: str) -> dict:
  """Folded weights from the pytorch-fid .pth or a converted .npz, {name:
  (kernel, bias)}, with 'fc': the classifier's (kernel [2048, 1008], bias)
  where the file has it."""
  if not os.path.exists(path):
    raise FileNotFoundError(
        f"Inception weights {path!r} not found; pass the local copy of"
        " pt_inception-2015-12-05-6726825d.pth (or the .npz that"
        " `python -m cvqcar.convert_weights --inception=...` writes)")
  if path.endswith(".npz"):
    with np.load(path) as f:
      state = dict(f)
  else:
    try:
      import torch
    except ImportError:
      raise ImportError(f"reading {path} needs torch; convert it once to"
                        " .npz with `python -m cvqcar.convert_weights`"
                        " where torch is installed") from None
    state = {k: v.numpy() for k, v in
             torch.load(path, map_location="cpu").items()}
  weights = fold_batch_norms(state)
  if len(weights) != 94:
    raise ValueError(f"{path} holds {len(weights)} conv + batch-norm layers;"
                     " the FID InceptionV3 has 94")
  if "fc.weight" in state:
    fc = np.asarray(state["fc.weight"], np.float32)
    if fc.shape != (LOGITS, FEATURES):
      raise ValueError(f"{path}: fc.weight is {fc.shape}, expected"
                       f" {(LOGITS, FEATURES)}")
    weights["fc"] = (fc.T, np.asarray(state["fc.bias"], np.float32))
  return weights


def _conv(w, name, x, stride=1, padding=(0, 0)):
  kernel, bias = w[name]
  y = jax.lax.conv_general_dilated(
      x, kernel, (stride, stride), [(p, p) for p in padding],
      dimension_numbers=("NHWC", "HWIO", "NHWC"), precision=_HIGHEST)
  return jax.nn.relu(y + bias)


def _max_pool(x, stride=2, padding=0):
  pad = ((0, 0), (padding, padding), (padding, padding), (0, 0))
  return jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (1, 3, 3, 1),
                               (1, stride, stride, 1), pad)


def _avg_pool(x):
  """3x3, stride 1, padding 1, averaging over the in-image pixels only."""
  pad = ((0, 0), (1, 1), (1, 1), (0, 0))
  total = jax.lax.reduce_window(x, 0.0, jax.lax.add, (1, 3, 3, 1),
                                (1, 1, 1, 1), pad)
  count = jax.lax.reduce_window(jnp.ones(x.shape[1:3] + (1,), x.dtype)[None],
                                0.0, jax.lax.add, (1, 3, 3, 1), (1, 1, 1, 1),
                                pad)
  return total / count


def _block_a(w, n, x):
  return jnp.concatenate([
      _conv(w, f"{n}.branch1x1", x),
      _conv(w, f"{n}.branch5x5_2", _conv(w, f"{n}.branch5x5_1", x),
            padding=(2, 2)),
      _conv(w, f"{n}.branch3x3dbl_3", _conv(
          w, f"{n}.branch3x3dbl_2", _conv(w, f"{n}.branch3x3dbl_1", x),
          padding=(1, 1)), padding=(1, 1)),
      _conv(w, f"{n}.branch_pool", _avg_pool(x))], -1)


def _block_b(w, n, x):
  dbl = _conv(w, f"{n}.branch3x3dbl_2", _conv(w, f"{n}.branch3x3dbl_1", x),
              padding=(1, 1))
  return jnp.concatenate([
      _conv(w, f"{n}.branch3x3", x, stride=2),
      _conv(w, f"{n}.branch3x3dbl_3", dbl, stride=2),
      _max_pool(x)], -1)


def _block_c(w, n, x):
  row, col = (0, 3), (3, 0)  # paddings of the 1x7 and 7x1 convs
  b7 = _conv(w, f"{n}.branch7x7_1", x)
  b7 = _conv(w, f"{n}.branch7x7_3", _conv(w, f"{n}.branch7x7_2", b7,
                                          padding=row), padding=col)
  dbl = _conv(w, f"{n}.branch7x7dbl_1", x)
  for i, pad in zip((2, 3, 4, 5), (col, row, col, row), strict=True):
    dbl = _conv(w, f"{n}.branch7x7dbl_{i}", dbl, padding=pad)
  return jnp.concatenate([_conv(w, f"{n}.branch1x1", x), b7, dbl,
                          _conv(w, f"{n}.branch_pool", _avg_pool(x))], -1)


def _block_d(w, n, x):
  b3 = _conv(w, f"{n}.branch3x3_2", _conv(w, f"{n}.branch3x3_1", x),
             stride=2)
  b7 = _conv(w, f"{n}.branch7x7x3_1", x)
  b7 = _conv(w, f"{n}.branch7x7x3_2", b7, padding=(0, 3))
  b7 = _conv(w, f"{n}.branch7x7x3_3", b7, padding=(3, 0))
  b7 = _conv(w, f"{n}.branch7x7x3_4", b7, stride=2)
  return jnp.concatenate([b3, b7, _max_pool(x)], -1)


def _block_e(w, n, x, pool):
  b3 = _conv(w, f"{n}.branch3x3_1", x)
  dbl = _conv(w, f"{n}.branch3x3dbl_2", _conv(w, f"{n}.branch3x3dbl_1", x),
              padding=(1, 1))
  pooled = _avg_pool(x) if pool == "avg" else _max_pool(x, 1, 1)
  return jnp.concatenate([
      _conv(w, f"{n}.branch1x1", x),
      _conv(w, f"{n}.branch3x3_2a", b3, padding=(0, 1)),
      _conv(w, f"{n}.branch3x3_2b", b3, padding=(1, 0)),
      _conv(w, f"{n}.branch3x3dbl_3a", dbl, padding=(0, 1)),
      _conv(w, f"{n}.branch3x3dbl_3b", dbl, padding=(1, 0)),
      _conv(w, f"{n}.branch_pool", pooled)], -1)


def outputs(weights: dict, images: jax.Array) -> dict[str, jax.Array]:
  """{'pool' [B, 2048], 'spatial' [B, 2023], and 'logits' [B, 1008] where
  the weights have 'fc'} of images [B, H, W, 3] in [-1, 1].

  Pure: jit it with the weights as an argument (never as a constant).
  """
  x = (jnp.clip(images.astype(jnp.float32), -1, 1) + 1) / 2  # [0, 1]
  x = jax.image.resize(x, (x.shape[0], 299, 299, 3), "bilinear",
                       antialias=False, precision=_HIGHEST)
  x = 2 * x - 1
  for layer in _STEM:
    if layer == "max":
      x = _max_pool(x)
    else:
      name, _, stride, padding = layer
      x = _conv(weights, name, x, stride, padding)
  for name in ("Mixed_5b", "Mixed_5c", "Mixed_5d"):
    x = _block_a(weights, name, x)
  x = _block_b(weights, "Mixed_6a", x)
  out = {}
  for name in ("Mixed_6b", "Mixed_6c", "Mixed_6d", "Mixed_6e"):
    if name == "Mixed_6d":  # its 1x1 branch again: XLA computes it once
      spatial = _conv(weights, f"{name}.branch1x1", x)[..., :7]
      out["spatial"] = spatial.reshape(spatial.shape[0], -1)
    x = _block_c(weights, name, x)
  x = _block_d(weights, "Mixed_7a", x)
  x = _block_e(weights, "Mixed_7b", x, "avg")
  x = _block_e(weights, "Mixed_7c", x, "max")
  out["pool"] = jnp.mean(x, axis=(1, 2))
  if "fc" in weights:
    # The bias is left out, as the ADM evaluator and torch-fidelity do.
    out["logits"] = jnp.dot(out["pool"], weights["fc"][0],
                            precision=_HIGHEST)
  return out


def features(weights: dict, images: jax.Array) -> jax.Array:
  """Pool features [B, 2048] of images [B, H, W, 3] in [-1, 1].

  Pure: jit it with the weights as an argument (never as a constant).
  """
  return outputs(weights, images)["pool"]
