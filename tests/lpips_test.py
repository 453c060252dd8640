"""LPIPS: distance properties and the local weight file round trip."""

import jax
import numpy as np
import pytest
from flax import nnx

from cvqcar.tokenizer import lpips


def test_roundtrip_and_distance_properties(tmp_path):
  model = lpips.LPIPS(rngs=nnx.Rngs(3))
  path = str(tmp_path / "lpips.npz")
  model.save(path)
  loaded = lpips.load(path)
  x = jax.random.uniform(jax.random.key(0), (2, 32, 32, 3), minval=-1.0)
  y = jax.random.uniform(jax.random.key(1), (2, 32, 32, 3), minval=-1.0)
  np.testing.assert_allclose(loaded(x, y), model(x, y), rtol=1e-5)
  np.testing.assert_allclose(model(x, x), 0.0, atol=1e-6)
  assert np.all(np.asarray(model(x, y)) > 0)
  np.testing.assert_allclose(model(x, y), model(y, x), rtol=1e-5)


def test_missing_and_mismatched_files(tmp_path):
  with pytest.raises(FileNotFoundError, match="perceptual_weights"):
    lpips.load(str(tmp_path / "nope.npz"))
  weights = lpips.LPIPS(rngs=nnx.Rngs(0)).weights()
  weights["lin0"] = np.zeros(3, np.float32)
  path = str(tmp_path / "bad.npz")
  np.savez(path, **weights)
  with pytest.raises(ValueError, match=r"lin0 has shape \(3,\)"):
    lpips.load(path)
