"""Why the plain CVQ codebook collapses, and what keeps it alive.

  python launch/sweep.py --sweep=configs/sweeps/plain_collapse.py

Channel tokens at the equal budget of 64 (8 x 8 maps, 64 channels, 32 px),
K = 1024, plain codebook (no EMA, no restarts), 300 steps, one factor at a
time: the codewords' initial scale (N(0, s^2) codewords of 64 numbers have
norm ~8s, the encoder's 8 x 8 channel maps far less), and the l2-normalised
(cosine) lookup. (Tokens per batch against K varies along K in
equal_budget.py: 2,048 tokens a batch against 1,024 to 65,536 codes.) Usage is
measured on 256 held-out crops (16,384 tokens, 16 x K). `python -m
cvqcar.report` tabulates them in docs/results.md.
"""

FIXED = {"model.num_codes": 1024, "model.codebook.ema": False,
         "batch_size": 32, "num_train_steps": 300, "eval_every": 300,
         "checkpoint_every": 300, "data.num_eval_images": 256}


def get_sweep() -> dict:
  points = [
      {"model.codebook.init_scale": 1.0},
      {"model.codebook.init_scale": 0.1},
      {"model.codebook.init_scale": 0.01},
      {"model.codebook.init_scale": 1.0, "model.codebook.cosine": True},
  ]
  return {"config": "configs/cvq_tokenizer.py:tiny,budget=64",
          "workdir_root": "runs/sweeps/plain_collapse",
          "fixed": FIXED, "points": points}
