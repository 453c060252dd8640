"""bench/quantization_gap.py: the lookup's loss against its definition."""

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from bench import quantization_gap
from conftest import tiny_config
from cvqcar.tokenizer import model as tokenizer_lib


def test_a_codebook_holding_the_maps_loses_nothing():
  tokenizer = tokenizer_lib.Tokenizer(tiny_config().model, rngs=nnx.Rngs(0))
  images = jnp.asarray(np.random.default_rng(0).uniform(
      -1, 1, (2, 16, 16, 3)), jnp.float32)
  quantized, unquantized, missed = quantization_gap.gap(tokenizer, images)
  assert 0.05 < missed  # random codewords miss the maps
  assert abs(quantized - unquantized) > 1e-3
  z = tokenizer.encoder(images)  # [2, 8, 8, 8 channels]
  maps_nd = jnp.transpose(z, (0, 3, 1, 2)).reshape(16, 64)
  vq = tokenizer.quantizer.vq
  vq.codebook_kd[...] = jnp.concatenate([maps_nd, vq.codebook_kd[...][16:]
                                         + 100.0])
  quantized, unquantized, missed = quantization_gap.gap(tokenizer, images)
  assert missed < 1e-6
  assert quantized == pytest.approx(unquantized, abs=1e-3)
