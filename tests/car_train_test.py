"""The tokenizer -> stage I -> stage II -> sample chain on embedded data."""

import logging
import os
import re
import shutil

import ml_collections
import numpy as np
import pytest
from flax import nnx

from configs import car_stage1, car_stage2
from conftest import tiny_config
from cvqcar import checkpoint, fingerprint, logs
from cvqcar.car import export as car_export
from cvqcar.car import model as car_model
from cvqcar.car import pipeline, qwen3
from cvqcar.car import state as car_state
from cvqcar.car import trainer as car_trainer
from cvqcar.data import pairs
from cvqcar.tokenizer import export
from cvqcar.tokenizer import model as tokenizer_lib

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
  # Throughput in the log: every train line has perf/*, tokens included.
  rows = logs.read_metrics(str(tmp_path / "car1" / logs.METRICS_FILE))
  train = [r for r in rows.values() if "train/loss" in r]
  assert len(train) == 30
  for name in ("perf/step_time_s", "perf/examples_per_s_per_device",
               "perf/tokens_per_s_per_device", "perf/tflops_per_device"):
    assert all(r[name] > 0 for r in train), name
  # 'cpu' has no peak in the table: no MFU rather than a made-up one.
  assert not any("perf/mfu" in r for r in train)

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


def test_runs_are_pinned_to_their_tokenizer_export(tokenizer_export, tmp_path,
                                                   caplog):
  # Copies: the session's export is shared, and this one gets replaced.
  tok, orig = str(tmp_path / "tok"), str(tmp_path / "orig")
  shutil.copytree(tokenizer_export, tok)
  shutil.copytree(tokenizer_export, orig)
  car1 = str(tmp_path / "car1")
  car_trainer.train_and_evaluate(
      car_config(car_stage1, tok, num_train_steps=1), car1)
  old = export.tokenizer_record(tok)
  assert fingerprint.read_record(car1) == old
  car = car_export.export_car(car1, str(tmp_path / "car"))
  assert fingerprint.read_record(car) == old

  # The tokenizer re-exported in place from another seed, on purpose.
  tok_config = checkpoint.load_config(tok)
  model = tokenizer_lib.Tokenizer(tok_config.model, rngs=nnx.Rngs(1))
  _, params, buffers = nnx.split(model, nnx.Param, ...)
  checkpoint.save_export(tok, tok_config,
                         {"params": params, "buffers": buffers},
                         overwrite=True)
  new = export.tokenizer_record(tok)["sha256"]
  both = (rf"{re.escape(tok)} \(sha256 {old['sha256'][:12]}.*"
          rf"{re.escape(tok)} \(sha256 {new[:12]}")
  resume = car_config(car_stage1, tok, num_train_steps=2)
  with pytest.raises(ValueError, match=rf"the workdir {re.escape(car1)}"
                     rf" was made with .*{both}.*allow_tokenizer_mismatch"):
    car_trainer.train_and_evaluate(resume, car1)
  stage2 = car_config(car_stage2, tok, num_train_steps=1, init_from=car1)
  with pytest.raises(ValueError, match=rf"stage-I workdir .*{both}"):
    car_trainer.train_and_evaluate(stage2, str(tmp_path / "car2"))
  with pytest.raises(ValueError, match=rf"the CAR export .*{both}.*"
                     "--allow_tokenizer_mismatch"):
    pipeline.sample_to_files(car, tok, ["a cat"], str(tmp_path / "s"))
  # The original weights pass under any path.
  assert len(pipeline.sample_to_files(car, orig, ["a cat"],
                                      str(tmp_path / "s"))) == 2

  # Opting out goes on, with a warning naming both.
  with caplog.at_level(logging.WARNING):
    pipeline.sample_to_files(car, tok, ["a cat"], str(tmp_path / "s"),
                             allow_tokenizer_mismatch=True)
  assert re.search(both, caplog.text), caplog.text
  resume.allow_tokenizer_mismatch = True
  assert sorted(car_trainer.train_and_evaluate(resume, car1).train) == [2]
  # The workdir now names the tokenizer it went on with.
  assert fingerprint.read_record(car1)["sha256"] == new


def test_eval_counts_every_example_once(tokenizer_export, tmp_path):
  # Pre-tokenized pairs: the loss compared is the CAR model's alone (the
  # untrained tokenizer's nearest codes tie differently on another mesh).
  rng = np.random.default_rng(0)
  shards = str(tmp_path / "tokens")
  pairs.write_shards([{"tokens": rng.integers(0, 64, 8),
                       "caption": f"pair {i}"} for i in range(12)], shards,
                     num_shards=2)
  # An eval set smaller than a batch: padded and masked, not dropped.
  config = car_config(car_stage1, tokenizer_export, num_train_steps=0,
                      batch_size=16)
  config.data.update(name="shards", shards=shards, pretokenized=True,
                     num_eval_examples=8)
  summary = car_trainer.train_and_evaluate(config, str(tmp_path / "car"))
  assert summary.eval["eval/examples"] == 8
  # The per-example mean, directly: the same 8 pairs as one batch of 8 and
  # the same initial weights (the seed's).
  cfg, mesh, tokenizer, text_tok, _ = car_trainer.prepare(config)
  graphdef, state, _ = car_state.init_state(
      cfg, mesh, tokenizer.quantizer.vq.codebook())
  direct = ml_collections.ConfigDict(cfg.to_dict())
  direct.batch_size = 8
  (batch,) = list(pairs.eval_dataset(direct, text_tok))
  logits_bck = state.model(graphdef)(batch["text"], batch["text_mask"],
                                     batch["tokens"])
  want = car_model.loss_fn(logits_bck, batch["tokens"])
  np.testing.assert_allclose(summary.eval["eval/loss"], float(want),
                             rtol=1e-5)
  config.data.num_eval_examples = 0
  with pytest.raises(ValueError, match="num_eval_examples=0 and the eval"
                     " source holds 12 records"):
    car_trainer.train_and_evaluate(config, str(tmp_path / "empty"))
