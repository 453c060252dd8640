"""The quick start's budget: what the tiny tokenizer gains in ~10 CPU minutes.

  python launch/sweep.py --sweep=configs/sweeps/quickstart_budget.py

Every point is the `tiny` tokenizer (32 px crops of the embedded photos, 256
channel tokens of 8 x 8) with one thing changed, evaluated on the 256
held-out crops (cat, coffee cup, gravel). Measured on a 2-core x86_64 CPU,
2026-12-01 (docs/results.md, the quick start's budget; PSNR in dB at the
last step):

  screen, 300 steps of batch 32, K = 1024       PSNR   SSIM  usage
  as is                                         21.01  0.43  91%
  K = 4096                                      21.36  0.47  75%
  commitment beta 1.0 (0.25)                    20.59  0.38  82%
  channel maps of 4 x 4 (f = 8)                 20.49  0.36  91%
  learning rate 2e-3 (1e-3)                     21.07  0.42  88%
  quantization weight 1.0 (5.0)                 21.08  0.45  97%
  cosine codebook                               20.93  0.47  100%
  batch 16 (half the images)                    20.75  0.40  87%

  same images (19,200 crops) in about the same time, K = 4096
  600 steps of 32 (K = 1024: the former tiny)   21.77  0.51  91%
  1,200 steps of 16                             22.60  0.59  68%
  2,400 steps of 8 (tiny)                       22.92  0.61  66%
  and 3,200 steps of 8 (a third longer)         23.06  0.63  68%

Smaller batches won at a fixed number of images (more updates); batch 4 was
no better than 8 per image seen (22.0 against 21.9 dB after 6,400 crops) and
slower per image, so it was stopped there.
"""

SCREEN = {"batch_size": 32, "model.num_codes": 1024, "num_train_steps": 300}


def get_sweep() -> dict:
  screen = [{}, {"model.num_codes": 4096}, {"loss.beta": 1.0},
            {"model.channel_mults": (1, 2, 2, 2)},
            {"optimizer.learning_rate": 2e-3},
            {"loss.quantization_weight": 1.0},
            {"model.codebook.cosine": True}, {"batch_size": 16}]
  budget = [{"batch_size": 32, "num_train_steps": 600, "model.num_codes": 1024},
            {"batch_size": 16, "num_train_steps": 1200},
            {"batch_size": 8, "num_train_steps": 2400},
            {"batch_size": 8, "num_train_steps": 3200}]
  return {"config": "configs/cvq_tokenizer.py:tiny",
          "workdir_root": "runs/sweeps/quickstart_budget",
          # Every run also evaluates and checkpoints at its last step.
          "fixed": {"eval_every": 800, "checkpoint_every": 800},
          "points": [{**SCREEN, **p} for p in screen] + budget}
