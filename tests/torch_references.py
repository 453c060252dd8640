"""The PyTorch reference implementations the field uses, imported for
parity tests (random weights; nothing downloads).

PyPI's torchvision wheel is built against CUDA torch: with the CPU torch
the tests install, its detection-op extension cannot load and its import
fails registering fake kernels for those ops (torchvision::nms, ...). The
models used here are pure PyTorch modules, so the import runs with that
registration skipped; no reference computation is altered.
"""

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


def fid_inception():
  """pytorch-fid's InceptionV3 (pool features) with random weights, and
  its state dict under the published file's names."""
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
  state = {k: v.numpy() for k, v in built["net"].state_dict().items()}
  return model, state
