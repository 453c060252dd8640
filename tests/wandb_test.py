"""Weights & Biases beside TensorBoard, checked in W&B's offline mode."""

import glob
import json
import struct
import sys

import numpy as np
import pytest

from conftest import tiny_config
from cvqcar import wandb_writer
from cvqcar.tokenizer import trainer as tokenizer_trainer


def offline_history(run_dir: str) -> dict[int, dict[str, object]]:
  """{step: {key: value}} of the history records in an offline run's
  .wandb file: W&B's record log (a 7-byte file header ':W&B', magic,
  version; then 32 KiB blocks of records, each a 7-byte header (crc,
  length, type: 1 full, 2 first, 3 middle, 4 last) and a protobuf
  Record)."""
  from wandb.proto import wandb_internal_pb2

  (path,) = glob.glob(f"{run_dir}/wandb/*run-*/run-*.wandb")
  data = open(path, "rb").read()
  assert data[:4] == b":W&B"
  pos, block, part, history = 7, 32768, b"", {}
  while pos + 7 <= len(data):
    if block - pos % block < 7:  # a block's tail too short for a header
      pos += block - pos % block
      continue
    _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
    chunk, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
    if kind == 0:
      break
    part = chunk if kind in (1, 2) else part + chunk
    if kind not in (1, 4):
      continue
    record = wandb_internal_pb2.Record()
    record.ParseFromString(part)
    if record.WhichOneof("record_type") == "history":
      items = {i.key or "/".join(i.nested_key): json.loads(i.value_json)
               for i in record.history.item}
      history.setdefault(int(items["_step"]), {}).update(items)
  return history


@pytest.mark.slow
def test_an_offline_run_logs_every_scalar_of_metrics_jsonl_and_images(
    tmp_path, monkeypatch):
  pytest.importorskip("wandb")
  monkeypatch.setenv("WANDB_MODE", "offline")
  monkeypatch.setenv("WANDB_SILENT", "true")
  config = tiny_config()
  config.wandb.project = "cvqcar-test"
  config.eval_every = 2
  workdir = str(tmp_path / "run")
  tokenizer_trainer.train_and_evaluate(config, workdir)
  history = offline_history(workdir)
  lines = [json.loads(line) for line in open(f"{workdir}/metrics.jsonl")]
  assert len(lines) >= 5 and any("eval/psnr" in line for line in lines)
  for line in lines:
    step = line.pop("step")
    for key, value in line.items():
      assert history[step][key] == pytest.approx(value, rel=1e-6), (step,
                                                                    key)
  # The reconstruction grids too, at each eval.
  for step in (0, 2, 4):
    assert history[step]["reconstructions/_type"] == "images/separated"
    assert history[step]["reconstructions/count"] == 1
  # A resumed run goes on in the same W&B run.
  run_id = open(f"{workdir}/{wandb_writer.RUN_ID_FILE}").read()
  config.num_train_steps = 6
  tokenizer_trainer.train_and_evaluate(config, workdir)
  assert open(f"{workdir}/{wandb_writer.RUN_ID_FILE}").read() == run_id
  assert glob.glob(f"{workdir}/wandb/*run-*-{run_id}")


def test_asking_for_wandb_without_it_names_the_fix(monkeypatch, tmp_path):
  config = tiny_config()
  assert wandb_writer.create(config, str(tmp_path), 0) is None  # off
  config.wandb.project = "p"
  assert wandb_writer.create(config, str(tmp_path), 1) is None  # process 1
  monkeypatch.setitem(sys.modules, "wandb", None)  # import fails
  with pytest.raises(ImportError, match="pip install wandb"):
    wandb_writer.create(config, str(tmp_path), 0)


def test_images_and_scalars_reach_the_run():
  logged = []

  class Run:
    def log(self, data, step):
      logged.append((step, data))

  pytest.importorskip("wandb")
  writer = wandb_writer.WandbWriter(Run())
  writer.write_scalars(3, {"a": np.float32(1.5)})
  writer.write_images(3, {"grid": np.zeros((2, 4, 4, 3), np.float32)})
  assert logged[0] == (3, {"a": 1.5})
  assert len(logged[1][1]["grid"]) == 2
