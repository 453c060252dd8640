"""CAR stage II: train everything end to end from a stage-I checkpoint.

Run (after stage I):
  python -m cvqcar.train --config=configs/car_stage2.py:tiny \
      --config.init_from=runs/car1_tiny --workdir=runs/car2_tiny

Imports the stage-I config, so the tokenizer, LLM and data cannot drift
between the stages; only what changes is set here: every parameter trains,
at lr 2e-5.
"""

import ml_collections

from configs import car_stage1


def get_config(arg: str = "") -> ml_collections.ConfigDict:
  config = car_stage1.get_config(arg)
  config.stage = 2
  config.optimizer.learning_rate = 2e-5
  config.init_from = ""
  if "tiny" in arg:
    config.init_from = "runs/car1_" + (
        "c2i_fashion" if "c2i" in arg and "fashion" in arg else
        "fashion" if "fashion" in arg else "tiny")
  if "tiny" in arg:
    config.optimizer.learning_rate = 2e-4
    config.num_train_steps = 100
    if "fashion" in arg:
      config.optimizer.learning_rate = 3e-4
      config.num_train_steps = 3000
      config.eval_every = config.checkpoint_every = 1000
  return config
