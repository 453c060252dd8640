"""Export fingerprints, and the records that pin runs to a tokenizer export."""

import json
import os
import shutil

import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file, save_file

from cvqcar import checkpoint, fingerprint
from cvqcar.tokenizer import export
from cvqcar.tokenizer import model as tokenizer_lib


def test_fingerprint_changes_with_any_array_and_only_then():
  arrays = {"params/w": np.arange(6, dtype=np.float32).reshape(2, 3),
            "params/b": np.zeros(3, np.float32),
            "buffers/count": np.asarray(7, np.int32)}
  base = fingerprint.arrays_sha256(arrays)
  assert fingerprint.arrays_sha256(
      {k: v.copy() for k, v in reversed(arrays.items())}) == base
  w = arrays["params/w"]
  nudged = w.copy()
  nudged[1, 2] = np.nextafter(nudged[1, 2], np.float32(10))
  changes = {
      "one value": {"params/w": nudged},
      "a shape": {"params/w": w.reshape(3, 2)},
      "a dtype": {"params/w": w.astype(np.float64)},
      "a scalar": {"buffers/count": np.asarray(8, np.int32)},
      # The same bytes in the arrays' order, moved across a boundary.
      "a boundary": {"params/b": np.zeros(4, np.float32),
                     "params/w": w.reshape(-1)[1:]},
  }
  seen = {base}
  for what, change in changes.items():
    sha = fingerprint.arrays_sha256({**arrays, **change})
    assert sha not in seen, what
    seen.add(sha)
  renamed = {("params/v" if k == "params/w" else k): v
             for k, v in arrays.items()}
  dropped = {k: v for k, v in arrays.items() if k != "params/b"}
  for other in (renamed, dropped):
    assert fingerprint.arrays_sha256(other) not in seen


def test_export_refuses_to_replace_another_export_without_overwrite(
    tmp_path):
  out = str(tmp_path / "export")
  config = ml_collections.ConfigDict({"model": {"width": 4}})
  tree = {"params": {"w": jnp.arange(4.0)}}
  checkpoint.save_export(out, config, tree)
  sha = fingerprint.export_sha256(out)
  assert sha == checkpoint.tree_sha256(tree)
  assert json.loads((tmp_path / "export" / "export.json").read_text()) == {
      "sha256": sha}
  checkpoint.save_export(out, config, tree)  # the same weights: idempotent
  other = {"params": {"w": jnp.arange(4.0) + 1}}
  new = checkpoint.tree_sha256(other)
  with pytest.raises(FileExistsError, match=rf"{out} holds a different"
                     rf" export \(sha256 {sha[:12]}.*sha256 {new[:12]}.*"
                     "--overwrite"):
    checkpoint.save_export(out, config, other)
  assert fingerprint.export_sha256(out) == sha  # left as it was
  checkpoint.save_export(out, config, other, overwrite=True)
  assert fingerprint.export_sha256(out) == new
  # Without export.json: the safetensors metadata's, else (an export
  # written before fingerprints) hashed from its arrays.
  os.remove(tmp_path / "export" / "export.json")
  assert fingerprint.export_sha256(out) == new
  file = str(tmp_path / "export" / "model.safetensors")
  save_file(load_file(file), file, metadata={"format": "cvqcar"})
  assert fingerprint.export_sha256(out) == new


def test_tokenizer_record_of_old_exports_is_computed_from_arrays(
    tokenizer_export, tmp_path):
  rec = export.tokenizer_record(tokenizer_export)
  assert rec == {"source": os.path.abspath(tokenizer_export),
                 "sha256": fingerprint.export_sha256(tokenizer_export)}
  _, params, buffers = nnx.split(export.load_tokenizer(tokenizer_export),
                                 nnx.Param, ...)
  assert rec["sha256"] == checkpoint.tree_sha256(
      {"params": params, "buffers": buffers})
  old = tmp_path / "old"
  shutil.copytree(tokenizer_export, old)
  os.remove(old / "export.json")
  os.remove(old / "model.safetensors")  # Orbax arrays only, no metadata
  assert fingerprint.export_sha256(str(old)) is None
  assert export.tokenizer_record(str(old))["sha256"] == rec["sha256"]


def another_seed(path: str, seed: int = 1):
  """(config, tree) of the export's tokenizer with other random weights."""
  config = checkpoint.load_config(path)
  model = tokenizer_lib.Tokenizer(config.model, rngs=nnx.Rngs(seed))
  _, params, buffers = nnx.split(model, nnx.Param, ...)
  return config, {"params": params, "buffers": buffers}


def test_reexport_is_idempotent_and_another_needs_overwrite(
    tokenizer_export, tmp_path):
  workdir = os.path.join(os.path.dirname(tokenizer_export), "run")
  same = tmp_path / "same"
  shutil.copytree(tokenizer_export, same)
  export.export(workdir, str(same))  # the same weights again
  assert (fingerprint.export_sha256(str(same)) ==
          fingerprint.export_sha256(tokenizer_export))
  other = str(tmp_path / "other")
  checkpoint.save_export(other, *another_seed(tokenizer_export))
  with pytest.raises(FileExistsError, match=f"{other} holds a different"
                     " export"):
    export.export(workdir, other)
  export.export(workdir, other, overwrite=True)
  assert (fingerprint.export_sha256(other) ==
          fingerprint.export_sha256(tokenizer_export))
