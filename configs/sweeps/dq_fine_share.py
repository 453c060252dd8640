"""DQ-VAE: codes per image against reconstruction, over the fine share.

  python launch/sweep.py --sweep=configs/sweeps/dq_fine_share.py

The equal-budget network (`tiny,budget=64,dynamic`: an 8 x 8 x 64 fine grid
of 16 regions at 32 px, K = 4,096, EMA codebook) with the learned router at
fine shares 0.25, 0.5 and 0.75 (16 + 3 x 16 x share codes an image: 28, 40,
52) and the entropy router at the same shares, then the three-granularity
form (`levels` 3: 4 regions of 4 x 4 cells, 30% fine and 30% medium, 4 x
(0.4 + 0.3 x 4 + 0.3 x 16) = 25.6 codes an image), and the learned router
at 0.5 with the older pooled coarse codes (`encoder` 'pooled'); 400 steps
of batch 32 as the equal-budget sweep. The eval shares, measured where
`encode` runs, are reported beside their targets. `python -m
cvqcar.report` tabulates them and plots PSNR and SSIM against codes per
image.
"""

import itertools

FINE_SHARES = (0.25, 0.5, 0.75)


def get_sweep() -> dict:
  points = [{"model.dynamic.router": router,
             "model.dynamic.fine_fraction": share}
            for router, share in itertools.product(("learned", "entropy"),
                                                   FINE_SHARES)]
  points.append({"model.dynamic.levels": 3,
                 "model.dynamic.fine_fraction": 0.3,
                 "model.dynamic.medium_fraction": 0.3})
  # The coarse codes as a linear map of the four fine cells (the older
  # form) instead of the dual-grain encoder's deeper stage, at share 0.5.
  points.append({"model.dynamic.encoder": "pooled",
                 "model.dynamic.fine_fraction": 0.5})
  return {"config": "configs/cvq_tokenizer.py:tiny,budget=64,dynamic",
          "workdir_root": "runs/sweeps/dq_fine_share",
          "fixed": {"model.num_codes": 4096, "batch_size": 32,
                    "num_train_steps": 400, "eval_every": 400,
                    "checkpoint_every": 400},
          "points": points}
