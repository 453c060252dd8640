"""CAR stage I, tiny: the learning rate against prompt dropout.

  python launch/sweep.py --sweep=configs/sweeps/car_tiny.py --dry_run
  python launch/sweep.py --sweep=configs/sweeps/car_tiny.py

Six runs of `car_stage1.py:tiny` (the CPU-sized LLM over the tiny
tokenizer's export, exports/cvq_tiny: run the quick start's tokenizer and
`python -m cvqcar.export` first): learning rates 3e-4, 1e-3 (the tiny
default) and 3e-3, each with classifier-free guidance's prompt dropout at 0.1
(the default) and off, in runs/sweeps/car_tiny/<point>. Every run also
evaluates and checkpoints at its last step.
"""

import itertools

LEARNING_RATES = (3e-4, 1e-3, 3e-3)
CFG_DROP_PROBS = (0.1, 0.0)


def get_sweep() -> dict:
  points = [{"optimizer.learning_rate": lr, "cfg_drop_prob": drop}
            for lr, drop in itertools.product(LEARNING_RATES,
                                              CFG_DROP_PROBS)]
  return {"config": "configs/car_stage1.py:tiny",
          "workdir_root": "runs/sweeps/car_tiny",
          "fixed": {"eval_every": 200, "checkpoint_every": 200},
          "points": points}
