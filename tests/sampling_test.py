"""CAR sampling: per-sample keys independent of the batch, guidance
schedules."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from car_test import tiny_car
from flax import nnx

from cvqcar.car import sampling

# Six left-padded prompts of length 4 (mask 0 = pad); row 5 is empty.
TEXT = jnp.array([[0, 0, 5, 6], [1, 2, 3, 4], [0, 7, 8, 9], [0, 0, 0, 3],
                  [4, 4, 4, 4], [0, 0, 0, 0]])
MASK = jnp.array([[0, 0, 1, 1], [1, 1, 1, 1], [0, 1, 1, 1], [0, 0, 0, 1],
                  [1, 1, 1, 1], [0, 0, 0, 0]])
SAMPLED = dict(temperature=1.0, cfg_scale=3.0)


@pytest.fixture(scope="module")
def split():
  graphdef, state = nnx.split(tiny_car())
  return graphdef, (state,)


def sample(split, rows, keys, **kwargs):
  graphdef, states = split
  rows = np.asarray(rows)
  return np.asarray(sampling.generate(graphdef, states, TEXT[rows],
                                      MASK[rows], keys,
                                      **{**SAMPLED, **kwargs}))


def test_guidance_scales_follow_their_formulas():
  np.testing.assert_allclose(sampling.guidance_scales(3.0, 5), [3.0] * 5)
  np.testing.assert_allclose(sampling.guidance_scales(3.0, 5, "linear"),
                             [3.0, 2.5, 2.0, 1.5, 1.0])
  np.testing.assert_allclose(
      sampling.guidance_scales(3.0, 5, "cosine"),
      1 + 2 * (1 + np.cos(np.pi * np.arange(5) / 4)) / 2, rtol=1e-6)
  for schedule in sampling.CFG_SCHEDULES:
    scales = sampling.guidance_scales(4.0, 8, schedule)
    assert scales.shape == (8,) and scales[0] == 4.0, schedule
    assert np.all(np.diff(scales) <= 0), schedule
  # The cosine stays nearer cfg_scale early on, nearer 1 late.
  lin, cos = (sampling.guidance_scales(4.0, 8, s) for s in ("linear",
                                                            "cosine"))
  assert cos[1] > lin[1] and cos[-2] < lin[-2]
  np.testing.assert_allclose(sampling.guidance_scales(2.0, 1, "cosine"), [2])
  with pytest.raises(ValueError, match=r"cfg_schedule must be one of"
                     r" \('constant', 'linear', 'cosine'\), got 'cosin'"):
    sampling.guidance_scales(3.0, 8, "cosin")


def test_sample_keys_are_named_by_seed_prompt_and_sample():
  data = lambda k: np.asarray(jax.random.key_data(k))
  keys = sampling.sample_keys(5, [0, 0, 1, 3], [0, 1, 0, 2])
  assert keys.shape == (4,)
  want = jax.random.fold_in(jax.random.fold_in(jax.random.key(5), 3), 2)
  np.testing.assert_array_equal(data(keys[3]), data(want))
  np.testing.assert_array_equal(data(sampling.sample_keys(5, [3], [2])[0]),
                                data(want))
  assert len({tuple(data(k)) for k in keys}) == 4
  assert not np.array_equal(data(sampling.sample_keys(6, [3], [2])[0]),
                            data(want))
  with pytest.raises(ValueError, match=r"prompt_ids \(2,\) and sample_ids"
                     r" \(1,\)"):
    sampling.sample_keys(0, [0, 1], [0])
  with pytest.raises(ValueError, match=r"prompt_ids must be in 0\.\.2\*\*32"
                     r"-1, got -1\.\.0"):
    sampling.sample_keys(0, [-1, 0], [0, 0])


def test_a_row_depends_on_its_key_alone_not_on_its_batch(split):
  # Prompts 0 and 1, sampled alone (batch 2), among six, and reordered.
  keys = sampling.sample_keys(0, np.arange(6), np.zeros(6))
  pair = sample(split, [0, 1], keys[:2])
  six = sample(split, np.arange(6), keys)
  np.testing.assert_array_equal(six[:2], pair)
  order = np.array([4, 1, 5, 0, 3, 2])
  shuffled = sample(split, order, keys[order])
  np.testing.assert_array_equal(shuffled[np.argsort(order)], six)
  # The same prompt with another sample index is another sample.
  again = sample(split, [0, 0], sampling.sample_keys(0, [0, 0], [0, 1]))
  np.testing.assert_array_equal(again[0], pair[0])
  assert not np.array_equal(again[1], again[0])


def test_a_per_row_key_draws_what_the_single_key_path_draws_alone(split):
  # Row b with keys[b] in a batch is the single-key sampler on that row
  # alone: per-row keys keep the sampler's draws (filters included), only
  # unshared.
  keys = sampling.sample_keys(3, [0, 1], [0, 0])
  filters = dict(top_k=5, top_p=0.9)
  both = sample(split, [0, 1], keys, **filters)
  for b in range(2):
    np.testing.assert_array_equal(sample(split, [b], keys[b], **filters),
                                  both[b:b + 1])


def test_ramped_guidance_keeps_the_first_channel_and_changes_the_rest(split):
  keys = sampling.sample_keys(1, np.arange(6), np.zeros(6))
  rows = np.arange(6)
  constant = sample(split, rows, keys, cfg_schedule="constant")
  np.testing.assert_array_equal(sample(split, rows, keys), constant)
  for schedule in ("linear", "cosine"):
    ramped = sample(split, rows, keys, cfg_schedule=schedule)
    # Channel 0 is guided with cfg_scale under every schedule.
    np.testing.assert_array_equal(ramped[:, 0], constant[:, 0])
    assert not np.array_equal(ramped, constant), schedule


def test_ramped_guidance_cached_equals_full_recompute(split):
  keys = sampling.sample_keys(1, np.arange(6), np.zeros(6))
  rows = np.arange(6)
  np.testing.assert_array_equal(
      sample(split, rows, keys, cfg_schedule="cosine"),
      sample(split, rows, keys, cfg_schedule="cosine", use_cache=False))


def test_a_key_of_the_wrong_shape_is_refused(split):
  with pytest.raises(ValueError, match=r"one per row \(2,\), got shape"
                     r" \(3,\)"):
    sample(split, [0, 1], sampling.sample_keys(0, [0, 1, 2], [0, 0, 0]))
