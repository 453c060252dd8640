"""DQ-Transformer: prompt-conditioned generation of DQ-VAE token sequences.

Run (embedded captioned photos, CPU):
  python -m cvqcar.train \
      --config=configs/cvq_tokenizer.py:tiny,budget=64,dynamic \
      --workdir=runs/dq_tiny
  python -m cvqcar.export --workdir=runs/dq_tiny --out=exports/dq_tiny
  python -m cvqcar.train --config=configs/dq_transformer.py:tiny \
      --workdir=runs/dqt_tiny

The two-stream model (cvqcar.dq.transformer) reads a left-padded prompt
and generates the DQ-VAE's coarse-then-fine (code, position) sequence; the
frozen tokenizer export encodes each training batch. Its grid, K and text
vocabulary are read from the export and the text tokenizer at start-up.
Arguments: `tiny` (the CPU-sized trunks and the tiny DQ-VAE). Sharding as
for CAR: `config.mesh` sizes the data, fsdp and model axes.
"""

import ml_collections

from configs import car_stage1, cvq_tokenizer


def get_config(arg: str = "") -> ml_collections.ConfigDict:
  args = cvq_tokenizer.parse_args(arg, {"tiny"})
  tiny = "tiny" in args
  config = ml_collections.ConfigDict()
  config.trainer = "dq"  # what `python -m cvqcar.train` runs
  config.seed = 0
  # tiny: an 8 x 8 fine grid, so 16 to 64 codes per image.
  config.tokenizer = cvq_tokenizer.get_config(
      "tiny,budget=64,dynamic" if tiny else "dynamic").model
  config.tokenizer_export = "exports/dq_tiny" if tiny else ""
  # The workdir records the export's fingerprint; True lets a run go on
  # with another one.
  config.allow_tokenizer_mismatch = False
  config.text_tokenizer = "bytes"  # or the path of a tokenizer.json
  config.max_text_len = 64 if tiny else 128
  config.cond_drop_prob = 0.1  # prompt dropped -> unconditional training

  # Two qwen3 trunks (cvqcar.dq.transformer.DQConfig); grid, levels,
  # num_codes, text_vocab and max_text_len are filled in from the export and
  # tokenizer.
  config.model = ml_collections.ConfigDict({
      "grid": 0, "levels": 2, "num_codes": 0, "num_classes": 1,
      "text_vocab": 0,
      "max_text_len": 0, "width": 128 if tiny else 1024,
      "position_layers": 2 if tiny else 12,
      "content_layers": 2 if tiny else 12, "num_heads": 4 if tiny else 16,
      "num_kv_heads": 2 if tiny else 8, "head_dim": 32 if tiny else 64,
      "mlp_dim": 256 if tiny else 4096, "dtype": "float32"})

  stage1 = car_stage1.get_config("tiny" if tiny else "")
  config.data = stage1.data
  config.optimizer = stage1.optimizer
  config.optimizer.learning_rate = 1e-3 if tiny else 3e-4
  config.mesh = stage1.mesh
  config.dcn_mesh = stage1.dcn_mesh
  config.logical_axis_rules = stage1.logical_axis_rules + (
      ("classes", None), ("positions", None))

  config.batch_size = 16 if tiny else 256
  # Eval rows per step (0: batch_size); a short last batch is padded and
  # masked, so every eval example counts once.
  config.eval_batch_size = 0
  config.num_train_steps = 300 if tiny else 200_000
  config.run_steps = 0
  config.log_every = 20 if tiny else 100
  config.eval_every = 150 if tiny else 5_000
  config.checkpoint_every = 150 if tiny else 5_000
  config.keep_checkpoints = 3
  config.eval_at_start = True  # an eval at step 0: the untrained baseline
  # "A:B": a jax.profiler trace of steps A..B into WORKDIR/profile.
  config.profile_steps = ""
  # A workdir lock whose holder sent no heartbeat for this long is stale.
  config.lock_stale_after_s = 600.0
  # Weights & Biases beside TensorBoard (cvqcar/wandb_writer.py): a project
  # name turns it on; mode 'offline' (or WANDB_MODE) writes for `wandb sync`.
  config.wandb = ml_collections.ConfigDict(
      {"project": "", "entity": "", "name": "", "mode": ""})
  config.sample = ml_collections.ConfigDict()
  config.sample.prompts = stage1.sample.prompts
  config.sample.per_prompt = 4
  config.sample.temperature = 1.0
  config.sample.top_k = 0
  config.sample.top_p = 1.0
  config.sample.cfg_scale = 3.0
  return config
