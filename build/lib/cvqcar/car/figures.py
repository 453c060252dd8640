"""Figures of a CAR model's samples, for the notebooks and the README.

Each function draws one matplotlib figure and returns it
(cvqcar.figures.save writes it); `model` is a CAR model, `tokenizer` its
CVQ tokenizer and `text_tok` its text tokenizer.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from PIL import Image

from cvqcar import figures, visualize
from cvqcar.car import sampler as sampler_lib
from cvqcar.car import sampling
from cvqcar.data import text


def car_samples(model, tokenizer, text_tok, prompts: Sequence[str], *,
                per_prompt: int = 4, seed: int = 0, max_text_len: int = 64,
                **settings) -> tuple[np.ndarray, np.ndarray]:
  """CAR channel tokens [P, n, C] and images [P, n, H, W, 3] for each
  prompt (settings: temperature, top_k, top_p, cfg_scale, cfg_schedule);
  sample j of prompt i is drawn with `sampling.sample_keys(seed, [i],
  [j])`. `model` is a CAR model or a `sampler.Sampler` (on a mesh)."""
  repeated = [p for p in prompts for _ in range(per_prompt)]
  ids, mask = text.batch_encode(text_tok, repeated, max_text_len,
                                truncate=True)
  keys = sampling.sample_keys(
      seed, np.repeat(np.arange(len(prompts)), per_prompt),
      np.tile(np.arange(per_prompt), len(prompts)))
  if isinstance(model, sampler_lib.Sampler):
    tokens = model.tokens(ids, mask, keys, **settings)
  else:
    graphdef, state = nnx.split(model)
    tokens = sampling.generate(graphdef, (state,), jnp.asarray(ids),
                               jnp.asarray(mask), keys, **settings)
  images = np.asarray(jax.jit(tokenizer.decode)(tokens))
  shape = (len(prompts), per_prompt)
  return (np.asarray(tokens).reshape(shape + tokens.shape[1:]),
          images.reshape(shape + images.shape[1:]))


def prompt_grid(model, tokenizer, text_tok, prompts, per_prompt: int = 4,
                **settings):
  """A row of samples per prompt, the prompt beside it."""
  _, images = car_samples(model, tokenizer, text_tok, prompts,
                          per_prompt=per_prompt, **settings)
  fig = figures.image_grid(
      images, [f"sample {i + 1}" for i in range(per_prompt)],
      row_titles=[f'"{p}"' for p in prompts])
  fig.subplots_adjust(left=0.3)
  return fig


def sampling_sweep(model, tokenizer, text_tok, prompt: str, name: str,
                   values: Sequence[float], per_value: int = 4, **settings):
  """A row of samples of one prompt per value of one setting (e.g. name
  'cfg_scale' or 'temperature'), the same seed in every row."""
  rows = [car_samples(model, tokenizer, text_tok, [prompt],
                      per_prompt=per_value, **{**settings, name: v})[1][0]
          for v in values]
  fig = figures.image_grid(
      np.stack(rows), [f"seed {i}" for i in range(per_value)],
      row_titles=[f"{name} {v:g}" for v in values])
  fig.subplots_adjust(left=0.2)
  fig.suptitle(f'"{prompt}"', fontsize=10)
  return fig


def channel_progression(tokenizer, tokens_c, steps: int = 8):
  """One sample decoded from its first 1, 2, ... C channel tokens."""
  c = tokens_c.shape[-1]
  ks = sorted({int(round(k)) for k in np.geomspace(1, c, steps)})
  decodes = figures.prefix_decodes_of_tokens(
      tokenizer, np.asarray(tokens_c)[None], ks)[0]
  return figures.image_grid(decodes[None], [f"{k} of {c}" for k in ks])


def progression_gif(tokenizer, tokens_c, path: str, size: int = 192,
                    frame_ms: int = 120) -> str:
  """An animated GIF of one sample decoded from 1, 2, ..., C channel
  tokens; returns the path."""
  c = tokens_c.shape[-1]
  decodes = figures.prefix_decodes_of_tokens(
      tokenizer, np.asarray(tokens_c)[None], range(1, c + 1))[0]
  frames = [Image.fromarray(visualize.to_uint8(d)).resize(
      (size, size), Image.NEAREST) for d in decodes]
  os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
  frames[0].save(path, save_all=True, append_images=frames[1:],
                 duration=frame_ms, loop=0)
  return path
