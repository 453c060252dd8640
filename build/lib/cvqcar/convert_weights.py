"""Convert published PyTorch metric weights to .npz files (needs torch).

  python -m cvqcar.convert_weights \
      --inception=pt_inception-2015-12-05-6726825d.pth --out=inception.npz
  python -m cvqcar.convert_weights \
      --lpips=vgg16-397923af.pth,lpips/weights/v0.1/vgg.pth --out=lpips.npz

The Inception .npz keeps the state-dict names (`cvqcar.evaluate
--inception` reads either file); the LPIPS one is in the layout of
`cvqcar.tokenizer.lpips` (the torchvision VGG16 trunk and the lpips
package's linear layers, given together). Run once where torch is
installed; evaluation then needs no torch.
"""

from __future__ import annotations

import numpy as np
from absl import app, flags

from cvqcar.evaluation import inception
from cvqcar.tokenizer import lpips

_INCEPTION = flags.DEFINE_string("inception", "", "pytorch-fid .pth file.")
_LPIPS = flags.DEFINE_list("lpips", [], "VGG16 and LPIPS-linear .pth files.")
_OUT = flags.DEFINE_string("out", None, "The .npz to write.")


def _state(path: str) -> dict[str, np.ndarray]:
  import torch  # noqa: PLC0415 (only this command needs torch)

  state = torch.load(path, map_location="cpu")
  return {k: v.numpy() for k, v in state.items() if hasattr(v, "numpy")}


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if bool(_INCEPTION.value) == bool(_LPIPS.value):
    raise app.UsageError("give exactly one of --inception and --lpips")
  if _INCEPTION.value:
    arrays = _state(_INCEPTION.value)
    inception.fold_batch_norms(arrays)  # checks the layout
  else:
    merged = {}
    for path in _LPIPS.value:
      merged.update(_state(path))
    arrays = lpips.from_torch(merged)
  with open(_OUT.value, "wb") as f:
    np.savez(f, **arrays)
  print(f"wrote {len(arrays)} arrays to {_OUT.value}")


if __name__ == "__main__":
  flags.mark_flags_as_required(["out"])
  app.run(main)
