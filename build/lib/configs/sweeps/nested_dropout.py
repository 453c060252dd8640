"""Nested channel dropout: alpha in {0, 0.25, 0.5} for channel tokens.

  python launch/sweep.py --sweep=configs/sweeps/nested_dropout.py

`tiny,budget=64` (64 channel tokens of 8 x 8), K = 4096, EMA + restart
codebook, 400 steps of batch 32 (as configs/sweeps/equal_budget.py). Eval
reports PSNR from the first 4, 8, 16, 32 and 64 channels, on 256 held-out
crops; `python -m cvqcar.report` plots PSNR against kept channels for each
alpha.
"""


def get_sweep() -> dict:
  return {"config": "configs/cvq_tokenizer.py:tiny,budget=64",
          "workdir_root": "runs/sweeps/nested_dropout",
          "fixed": {"model.num_codes": 4096, "model.codebook.ema": True,
                    "batch_size": 32, "num_train_steps": 400, "eval_every": 400,
                    "checkpoint_every": 400, "data.num_eval_images": 256},
          "points": [{"model.nested_dropout_alpha": a}
                     for a in (0.0, 0.25, 0.5)]}
