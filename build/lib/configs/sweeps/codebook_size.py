"""Codebook size K x quantizer: CVQ against the patch-wise VQGAN baseline.

  python launch/sweep.py --sweep=configs/sweeps/codebook_size.py --dry_run
  python launch/sweep.py --sweep=configs/sweeps/codebook_size.py

Six runs of the tiny tokenizer: K in {256, 1024, 4096} for channel tokens
and for patch tokens, each in runs/sweeps/codebook_size/<point>.
"""

import itertools

NUM_CODES = (256, 1024, 4096)
QUANTIZERS = {
    "channel": {"model.quantize": "channel"},
    # Nested channel dropout only applies to channel tokens.
    "patch": {"model.quantize": "patch", "model.nested_dropout_alpha": 0.0},
}


def get_sweep() -> dict:
  points = [{"model.num_codes": k, **QUANTIZERS[q]}
            for k, q in itertools.product(NUM_CODES, QUANTIZERS)]
  return {"config": "configs/cvq_tokenizer.py:tiny",
          "workdir_root": "runs/sweeps/codebook_size",
          "points": points}
