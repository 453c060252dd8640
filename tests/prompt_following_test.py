"""The prompt-following score pairs each prompt's samples with its class."""

import numpy as np
import pytest

from cvqcar import prompt_following
from cvqcar.data import fashion

NUM = len(fashion.CLASSES)


def fake_sampler(class_of_prompt, resolution=4):
  """sample(prompts, n): n images per prompt whose first pixel holds the
  class `class_of_prompt` picks for it, the sample index in the second."""
  def sample(prompts, n):
    out = np.zeros((len(prompts), n, resolution, resolution, 3), np.float32)
    for p, prompt in enumerate(prompts):
      out[p, :, 0, 0, 0] = class_of_prompt(prompt)
      out[p, :, 0, 1, 0] = np.arange(n)
    return out
  return sample


def read_pixel(images):
  return images[:, 0, 0, 0].astype(int)


def true_class(prompt):
  """The class named in a prompt (the longest matching name wins)."""
  names = [c for c in range(NUM) if fashion.CLASSES[c] in prompt]
  return max(names, key=lambda c: len(fashion.CLASSES[c]))


@pytest.mark.parametrize("template", [fashion.HELD_OUT_TEMPLATE,
                                      *fashion.TRAIN_TEMPLATES])
def test_samples_of_the_named_class_score_one(template):
  result, prompts, images = prompt_following.score_prompts(
      fake_sampler(true_class), read_pixel, template, per_class=3)
  assert result["accuracy"] == 1.0 and result["template"] == template
  assert set(result["per_class"].values()) == {1.0}
  assert [true_class(p) for p in prompts] == list(range(NUM))
  assert images.shape == (NUM, 3, 4, 4, 3)


def test_wrong_and_partly_wrong_samples_are_counted_per_class():
  # Every prompt gets the next class: nothing follows the prompt.
  shifted = fake_sampler(lambda p: (true_class(p) + 1) % NUM)
  result, _, _ = prompt_following.score_prompts(
      shifted, read_pixel, fashion.HELD_OUT_TEMPLATE, per_class=2)
  assert result["accuracy"] == 0.0

  # The classifier says 'right' for the first 3 of 4 samples of classes
  # 0-4 and for none of classes 5-9: 15 / 40 in all.
  def classify(images):
    cls, index = read_pixel(images), images[:, 0, 1, 0].astype(int)
    ok = (index < 3) & (cls < 5)
    return np.where(ok, cls, (cls + 1) % NUM)

  result, _, _ = prompt_following.score_prompts(
      fake_sampler(true_class), classify, fashion.HELD_OUT_TEMPLATE,
      per_class=4)
  assert result["accuracy"] == pytest.approx(15 / 40)
  per = [result["per_class"][name] for name in fashion.CLASSES]
  assert per == [0.75] * 5 + [0.0] * 5


def test_a_sampler_giving_the_wrong_count_is_refused():
  def short(prompts, n):
    return fake_sampler(true_class)(prompts, n)[:, : n - 1]

  with pytest.raises(ValueError, match="per prompt"):
    prompt_following.score_prompts(short, read_pixel,
                                   fashion.HELD_OUT_TEMPLATE, per_class=3)
