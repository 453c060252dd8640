"""Channel vs patch tokens at an equal budget, across codebook sizes.

  python launch/sweep.py --sweep=configs/sweeps/equal_budget.py

The same tiny encoder and decoder with an 8 x 8 latent of 64 channels at
32 px (`tiny,budget=64`): 64 channel tokens of 64 numbers, or 64 patch tokens
of 64 numbers. K in {1024, 4096, 16384, 65536}, each with the EMA + restart
codebook and the plain one (gradient-trained, no EMA, no restarts); nested
dropout is off so the two axes differ only in the quantization axis
(configs/sweeps/nested_dropout.py varies it). 400 steps of batch 32. The
last two points are DQ-VAE (`dynamic`) on the same grid with EMA codebooks.
Usage is measured on max(256, 4K / 64) held-out crops: at least 4 x K
tokens. `python -m cvqcar.report` tabulates and plots them in
docs/results.md.
"""

import itertools

NUM_CODES = (1024, 4096, 16384, 65536)
TOKENS_PER_IMAGE = 64


def get_sweep() -> dict:
  points = []
  # EMA points first: the plain ones are the slow, interesting ones.
  for ema, k, axis in itertools.product((True, False), NUM_CODES,
                                        ("channel", "patch")):
    points.append({
        "model.quantize": axis, "model.num_codes": k,
        "model.codebook.ema": ema,
        "data.num_eval_images": max(256, 4 * k // TOKENS_PER_IMAGE)})
  # DQ-VAE on the same 8 x 8 grid: at most 64 tokens, 40 on average at the
  # default target of half the regions fine (16 regions: 16 + 3 x 8).
  for k in (1024, 16384):
    points.append({
        "model.quantize": "dynamic", "model.num_codes": k,
        "model.codebook.ema": True,
        "data.num_eval_images": max(256, 4 * k // TOKENS_PER_IMAGE)})
  return {"config": "configs/cvq_tokenizer.py:tiny,budget=64",
          "workdir_root": "runs/sweeps/equal_budget",
          "fixed": {"model.nested_dropout_alpha": 0.0, "batch_size": 32,
                    "num_train_steps": 400, "eval_every": 400,
                    "checkpoint_every": 400},
          "points": points}
