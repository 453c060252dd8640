"""The PyTorch reference implementations the field uses, imported for
parity tests (random weights; nothing downloads).

PyPI's torchvision wheel is built against CUDA torch: with the CPU torch
the tests install, its detection-op extension cannot load and its import
fails registering fake kernels for those ops (torchvision::nms, ...). The
models used here are pure PyTorch modules, so the import runs with that
registration skipped; no reference computation is altered.
"""

import pytest


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
