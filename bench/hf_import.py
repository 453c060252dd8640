"""Imports torch and transformers for the benches' Hugging Face baselines.

PyPI's torchvision wheel is built against CUDA torch: beside a CPU torch
its detection-op extension cannot load, and its import fails registering
fake kernels for those ops (torchvision::nms, ...). transformers imports
torchvision when it is installed (image utilities), so a failed torchvision
import makes `Qwen3ForCausalLM` unimportable too. The language models here
use none of those ops, so torchvision is imported once with that
registration skipped; nothing the baselines compute changes.
"""

from __future__ import annotations

import types


def _preload_torchvision(torch) -> None:
  """Imports torchvision, if installed, with register_fake a no-op."""
  from unittest import mock

  with mock.patch.object(torch.library, "register_fake",
                         lambda *a, **k: (lambda f: f)):
    try:
      import torchvision  # noqa: F401
    except ImportError:  # not installed: transformers does without it
      pass


def load() -> tuple[types.ModuleType, types.ModuleType] | str:
  """(torch, transformers), or a sentence saying why they cannot load."""
  try:
    import torch
  except ImportError as e:
    return f"torch is not installed ({e})"
  _preload_torchvision(torch)
  try:
    import transformers
    from transformers import Qwen3ForCausalLM  # noqa: F401
  except ImportError as e:
    return f"transformers with Qwen3 cannot be imported ({e})"
  return torch, transformers
