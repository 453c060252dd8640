"""The PyTorch reference implementations the field uses, imported for
parity tests (random weights; nothing downloads).

PyPI's torchvision wheel is built against CUDA torch: with the CPU torch
the tests install, its detection-op extension cannot load and its import
fails registering fake kernels for those ops (torchvision::nms, ...). The
models used here are pure PyTorch modules, so the import runs with that
registration skipped; no reference computation is altered.
"""

import numpy as np
import pytest


def preload() -> None:
  """Imports torchvision the way torchvision() does, if torch and it are
  installed: transformers imports it too (image utilities), and the plain
  import fails. Called by conftest before any test runs."""
  try:
    import torch
  except ImportError:
    return
  from unittest import mock

  with mock.patch.object(torch.library, "register_fake",
                         lambda *a, **k: (lambda f: f)):
    try:
      import torchvision  # noqa: F401
    except ImportError:
      pass


def torchvision():
  torch = pytest.importorskip("torch")
  from unittest import mock

  with mock.patch.object(torch.library, "register_fake",
                         lambda *a, **k: (lambda f: f)):
    try:
      import torchvision as tv
    except ImportError:
      pytest.skip("torchvision is not installed")
  return tv


def pytorch_fid():
  torchvision()
  return pytest.importorskip("pytorch_fid.inception")


def lpips():
  torchvision()
  return pytest.importorskip("lpips")


def _randomise_batch_norms(net, torch):
  g = torch.Generator().manual_seed(1)
  with torch.no_grad():
    for m in net.modules():
      if isinstance(m, torch.nn.BatchNorm2d):
        n = m.num_features
        m.weight.copy_(0.5 + torch.rand(n, generator=g))
        m.bias.copy_(0.1 * torch.randn(n, generator=g))
        m.running_mean.copy_(0.1 * torch.randn(n, generator=g))
        m.running_var.copy_(0.5 + torch.rand(n, generator=g))


def fid_inception(calibrate_on=None):
  """pytorch-fid's InceptionV3 (pool features) with random weights, and
  its state dict under the published file's names.

  Random batch-norm statistics wash the image out of the pool features
  (their spread across images is ~1e-7 of their size). With calibrate_on
  (uint8 images [N, H, W, 3]) each batch norm instead takes the mean and
  variance its input has on those images, so every layer passes on a
  normalised, image-dependent signal, as the trained network does.
  """
  pi = pytorch_fid()
  import torch

  torch.manual_seed(0)
  built = {}
  real_build = pi.fid_inception_v3

  def build():
    # The published weights would download here; keep the random init.
    with pytest.MonkeyPatch.context() as mp:
      mp.setattr(pi, "load_state_dict_from_url", lambda *a, **k: None)
      mp.setattr(torch.nn.Module, "load_state_dict", lambda *a, **k: None)
      net = real_build()
    _randomise_batch_norms(net, torch)
    built["net"] = net
    return net

  with pytest.MonkeyPatch.context() as mp:
    mp.setattr(pi, "fid_inception_v3", build)
    model = pi.InceptionV3([pi.InceptionV3.BLOCK_INDEX_BY_DIM[2048]]).eval()
  if calibrate_on is not None:
    norms = [m for m in model.modules()
             if isinstance(m, torch.nn.BatchNorm2d)]
    for m in norms:
      m.reset_running_stats()
      m.momentum = None  # a plain average over the calibration batch
      m.train()
    with torch.no_grad():
      x = torch.as_tensor(np.asarray(calibrate_on) / 255.0,
                          dtype=torch.float32)
      model(x.permute(0, 3, 1, 2))
    model.eval()
  state = {k: v.numpy() for k, v in built["net"].state_dict().items()}
  return model, state
