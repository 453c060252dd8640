"""The equal-budget K = 16,384 pair, channel vs patch, with 5x the steps.

  python launch/sweep.py --sweep=configs/sweeps/equal_budget_long.py

configs/sweeps/equal_budget.py trains 400 steps; patch tokens came out
about 1 dB PSNR ahead while both curves were still rising. This reruns its
K = 16,384 EMA + restart pair (same config, data and eval set) for 2,000
steps, evaluated every 500, to see whether the gap closes with training.
"""

from configs.sweeps import equal_budget

STEPS = 5 * 400


def get_sweep() -> dict:
  base = equal_budget.get_sweep()
  points = [p for p in base["points"]
            if p["model.num_codes"] == 16384 and p["model.codebook.ema"]
            and p["model.quantize"] in ("channel", "patch")]
  fixed = dict(base["fixed"], num_train_steps=STEPS, eval_every=STEPS // 4,
               checkpoint_every=STEPS // 4)
  return {"config": base["config"],
          "workdir_root": "runs/sweeps/equal_budget_long",
          "fixed": fixed, "points": points}
