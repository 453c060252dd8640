"""The tokenizer -> stage I -> stage II -> sample chain on embedded data."""

import os

import numpy as np
import pytest

from configs import car_stage1, car_stage2
from conftest import tiny_config
from cvqcar.car import export as car_export
from cvqcar.car import pipeline, qwen3
from cvqcar.car import state as car_state
from cvqcar.car import trainer as car_trainer

pytestmark = pytest.mark.slow


def car_config(stage_module, tokenizer_path, **overrides):
  config = stage_module.get_config("tiny")
  config.tokenizer = tiny_config().model
  config.tokenizer_export = tokenizer_path
  config.batch_size = 8
  config.data.num_eval_examples = 16
  config.log_every = 1
  config.eval_every = 1000
  config.checkpoint_every = 1000
  config.sample.prompts = ("a ginger tabby cat",)
  for key, value in overrides.items():
    config[key] = value
  return config


def test_stage1_stage2_sample_chain(tokenizer_export, tmp_path):
  config = car_config(car_stage1, tokenizer_export, num_train_steps=30)
  config.optimizer.learning_rate = 3e-3
  stage1 = car_trainer.train_and_evaluate(config, str(tmp_path / "car1"))
  losses = [stage1.train[s]["train/loss"] for s in sorted(stage1.train)]
  assert np.mean(losses[-5:]) < np.mean(losses[:5]) - 0.1, losses
  assert os.path.exists(tmp_path / "car1" / "images" /
                        "samples_0000030.png")

  # Stage I checkpoints hold what trains, not the frozen backbone; the
  # workdir names the backbone instead and refuses another one.
  ckpt_bytes = sum(p.stat().st_size for p in
                   (tmp_path / "car1" / "checkpoints").rglob("*")
                   if p.is_file())
  llm = car_state.resolve_llm_config(config)
  backbone_bytes = 4 * qwen3.param_count(llm)
  assert ckpt_bytes < backbone_bytes, (ckpt_bytes, backbone_bytes)
  record = car_state.read_backbone_record(str(tmp_path / "car1"))
  assert record["source"].startswith("random init")
  other = car_config(car_stage1, tokenizer_export, num_train_steps=31,
                     seed=1)
  with pytest.raises(ValueError, match="trained on the backbone random init"
                     r" \(seed 0\)"):
    car_trainer.train_and_evaluate(other, str(tmp_path / "car1"))
  resumed = car_config(car_stage1, tokenizer_export, num_train_steps=31)
  resumed.optimizer.learning_rate = 3e-3
  more = car_trainer.train_and_evaluate(resumed, str(tmp_path / "car1"))
  assert sorted(more.train) == [31]  # resumed, backbone rebuilt

  config = car_config(car_stage2, tokenizer_export, num_train_steps=3,
                      init_from=str(tmp_path / "car1"))
  stage2 = car_trainer.train_and_evaluate(config, str(tmp_path / "car2"))
  # Stage II starts from stage I's weights, not from scratch.
  assert stage2.train[1]["train/loss"] < np.mean(losses[:5]) - 0.1
  assert all(np.isfinite(v["train/loss"]) for v in stage2.train.values())

  out = car_export.export_car(str(tmp_path / "car2"), str(tmp_path / "exp"))
  paths = pipeline.sample_to_files(out, tokenizer_export,
                                   ["a ginger tabby cat", ""],
                                   str(tmp_path / "samples"), cfg_scale=2.0)
  assert len(paths) == 4 and all(os.path.exists(p) for p in paths)
  with pytest.raises(ValueError, match="more than the maximum text length"
                     ".*--truncate"):
    pipeline.sample_to_files(out, tokenizer_export, ["x" * 500],
                             str(tmp_path / "samples"))
  # A long prompt: cut to the trained length, or a longer limit.
  assert len(pipeline.sample_to_files(
      out, tokenizer_export, ["x" * 500], str(tmp_path / "cut"),
      truncate=True)) == 2
  assert len(pipeline.sample_to_files(
      out, tokenizer_export, ["a" * 72], str(tmp_path / "long"),
      max_text_len=80)) == 2
  with pytest.raises(ValueError, match="at most 2039"):
    pipeline.sample_to_files(out, tokenizer_export, ["a"],
                             str(tmp_path / "x"), max_text_len=5000)


def test_tokenizer_of_another_shape_is_refused(tokenizer_export, tmp_path):
  config = car_config(car_stage1, tokenizer_export, num_train_steps=1)
  config.tokenizer.latent_channels = 16
  with pytest.raises(ValueError, match=r"model.latent_channels: saved 8 vs"
                     r" now 16"):
    car_trainer.train_and_evaluate(config, str(tmp_path / "car"))


def test_stage2_needs_a_stage1_run(tokenizer_export, tmp_path):
  config = car_config(car_stage2, tokenizer_export, num_train_steps=1,
                      init_from="")
  with pytest.raises(ValueError, match="config.init_from"):
    car_trainer.train_and_evaluate(config, str(tmp_path / "car"))
