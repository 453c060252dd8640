"""Text to image files: CAR and tokenizer exports in, PNGs out.

What `python -m cvqcar.sample` runs; notebooks and benchmark writers call
`sample_to_files` directly.
"""

from __future__ import annotations

import logging
import os

import ml_collections
import numpy as np

from cvqcar import fingerprint, metrics, visualize
from cvqcar.car import sampler as sampler_lib
from cvqcar.car import sampling
from cvqcar.data import text
from cvqcar.tokenizer import export


def sample_to_files(car_path: str, tokenizer_path: str, prompts, out: str,
                    *, seed: int = 0, num_seeds: int = 1,
                    temperature: float = 1.0, top_k: int = 0,
                    top_p: float = 1.0, cfg_scale: float = 3.0,
                    cfg_schedule: str = "constant", truncate: bool = False,
                    max_text_len: int = 0, save_tokens: bool = False,
                    allow_tokenizer_mismatch: bool = False, mesh: str = "",
                    param_dtype: str = "bfloat16") -> list[str]:
  """Samples every prompt (an empty one is unconditional) and writes
  PNGs and coarse-to-fine strips; returns the paths written.

  Prompt i at seed s (files `<i>_<prompt>_s<s>*`) is drawn with
  `sampling.sample_keys(s, [i], [0])`: the same image whatever the other
  prompts or --num_seeds, and the same as generate_benchmark's sample 0 of
  its prompt i at --seed=s. `save_tokens` also writes its C channel tokens
  as `<i>_<prompt>_s<s>_tokens.npy` (int32 [C]).

  Prompts longer than the model's trained text length are refused unless
  `truncate` (keep their first ids) or a longer `max_text_len` is given
  (positions the model never saw in training: a warning says so). A
  tokenizer export other than the one CAR was trained with is refused
  unless `allow_tokenizer_mismatch`.

  The model is read onto --mesh=`mesh` (`sampler.sampling_mesh`; default
  this process's devices over 'data') in `param_dtype`, and the prompts
  are split over its batch axes.
  """
  fingerprint.check_record(
      car_path, export.tokenizer_record(tokenizer_path), "the CAR export",
      allow=allow_tokenizer_mismatch, opt_out=fingerprint.FLAG_OPT_OUT,
      warn_if_missing=True)
  car = sampler_lib.Sampler.load(car_path, mesh, param_dtype)
  config = car.config
  # The tokenizer must have the shape the CAR model was trained on.
  tokenizer = export.load_tokenizer(
      tokenizer_path,
      expect=ml_collections.ConfigDict({"model": config.tokenizer}))
  text_tok = text.load_text_tokenizer(config.text_tokenizer)
  prompts = list(prompts) or [""]
  limit = max_text_len or config.max_text_len
  longest = config.llm_config["max_position_embeddings"] - (
      car.num_channels + 1)
  if limit > longest:
    raise ValueError(f"--max_text_len={limit}: the backbone has"
                     f" {config.llm_config['max_position_embeddings']}"
                     f" positions, of which {car.num_channels + 1} are the"
                     f" image's; at most {longest}")
  if limit > config.max_text_len:
    logging.warning("text length %d beyond the %d the model was trained"
                    " with: expect weaker prompt following", limit,
                    config.max_text_len)
  try:
    ids, mask = text.batch_encode(text_tok, prompts, limit,
                                  truncate=truncate)
  except ValueError as e:
    raise ValueError(f"{e}; or sample with --truncate (keep the first"
                     f" {limit} ids) or --max_text_len=N") from None
  os.makedirs(out, exist_ok=True)
  written = []
  for s in range(seed, seed + num_seeds):
    keys = sampling.sample_keys(s, range(len(prompts)), [0] * len(prompts))
    tokens = car.tokens(
        ids, mask, keys, temperature=temperature, top_k=top_k, top_p=top_p,
        cfg_scale=cfg_scale, cfg_schedule=cfg_schedule)
    strips = sampling.coarse_to_fine_strip(tokenizer, tokens)
    titles = visualize.prefix_titles(metrics.prefix_lengths(tokens.shape[1]))
    for i, prompt in enumerate(prompts):
      name = "".join(ch if ch.isalnum() else "_" for ch in prompt)[:40]
      base = os.path.join(out, f"{i:02d}_{name or 'unconditional'}_s{s}")
      visualize.save_png(visualize.to_uint8(strips[i, -1]), base + ".png")
      visualize.save_png(visualize.strip_grid(
          strips[i][None], column_titles=titles), base + "_strip.png")
      written += [base + ".png", base + "_strip.png"]
      if save_tokens:
        np.save(base + "_tokens.npy", np.asarray(tokens[i]))
        written.append(base + "_tokens.npy")
      print(f"wrote {base}.png and {base}_strip.png")
  return written
