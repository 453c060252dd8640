"""Every quantizer along both axes at two equal budgets in bits.

  python launch/sweep.py --sweep=configs/sweeps/quantizer_zoo.py

The `tiny` tokenizer (32 px crops of the embedded photos, no GAN or LPIPS
loss) with K = 4,096 codes (12 bits a code; FSQ: levels (7, 5, 5, 5, 5),
4,375 codes) and a budget of B bits an image:
  768 bits: 64 tokens of 64 numbers (an 8 x 8 x 64 latent, `budget=64`);
  192 bits: 16 tokens of 16 numbers (a 4 x 4 x 16 latent, `budget=16`).
Residual VQ of depth 4 spends 4 codes a token, so it gets a quarter of the
tokens for the same bits: a 4 x 4 x 16 latent for 768 bits, 2 x 2 x 4 for
192. Channel tokens are channel maps, patch tokens latent positions, of the
same latent. Nested dropout is off, so the axes differ only in what a token
is. Usage is counted on max(256, 4K / codes) held-out crops (at least 4 x K
codes). `python -m cvqcar.report` tabulates and plots them in
docs/results.md.
"""

import itertools

NUM_CODES = 4096
DEPTH = 4  # residual VQ

# Budget in bits -> (latent channels, channel_mults) of an s x s x s*s
# latent at 32 px (s = 32 / 2**(levels - 1)).
GRIDS = {64: (64, (1, 2, 2)), 16: (16, (1, 2, 2, 2)), 4: (4, (1, 2, 2, 2, 2))}
BUDGETS = {768: 64, 192: 16}  # bits -> tokens of the single-code quantizers

QUANTIZERS = {
    "vq_ema": {"model.codebook.ema": True},
    "vq_plain": {"model.codebook.ema": False},
    "simvq": {"model.codebook.ema": False, "model.codebook.simvq": True},
    "ibq": {"model.codebook.ema": False,
            "model.codebook.index_backprop": True},
    "rotation": {"model.codebook.ema": False, "model.codebook.rotation": True},
    "kmeans": {"model.codebook.ema": False,
               "model.codebook.kmeans_batches": 8},
    "fsq": {"model.quantizer": "fsq", "model.num_codes": 7 * 5 ** 4,
            "model.scalar.fsq_levels": (7, 5, 5, 5, 5)},
    "lfq": {"model.quantizer": "lfq", "model.scalar.bits": 12},
    "bsq": {"model.quantizer": "bsq", "model.scalar.bits": 12},
    "rvq": {"model.codebook.ema": True, "model.rvq_depth": DEPTH},
}


def get_sweep() -> dict:
  points = []
  for bits, name, axis in itertools.product(BUDGETS, QUANTIZERS,
                                            ("channel", "patch")):
    tokens = BUDGETS[bits] // (DEPTH if name == "rvq" else 1)
    channels, mults = GRIDS[tokens]
    codes = tokens * (DEPTH if name == "rvq" else 1)
    points.append({
        "model.quantize": axis, "model.latent_channels": channels,
        "model.channel_mults": mults, "model.num_codes": NUM_CODES,
        **QUANTIZERS[name],
        "data.num_eval_images": max(256, 4 * NUM_CODES // codes)})
  return {"config": "configs/cvq_tokenizer.py:tiny",
          "workdir_root": "runs/sweeps/quantizer_zoo",
          "fixed": {"model.nested_dropout_alpha": 0.0, "batch_size": 32,
                    "num_train_steps": 200, "eval_every": 200,
                    "checkpoint_every": 200, "log_every": 25},
          "points": points}
