"""Workdir config files: atomic writes, clear errors on damaged ones."""

import ml_collections
import pytest
from etils import epath

from cvqcar import checkpoint


def big_config(tag: int) -> ml_collections.ConfigDict:
  # ~1 MB of JSON: a non-atomic write is visible half-done for a while.
  return ml_collections.ConfigDict(
      {"tag": tag, "model": {f"field_{i}": "x" * 100 for i in range(10_000)}})


def test_write_then_load_round_trips_and_leaves_no_temporary(tmp_path):
  checkpoint.write_config(str(tmp_path / "run"), big_config(3))
  assert checkpoint.load_config(str(tmp_path / "run")).tag == 3
  assert [p.name for p in (tmp_path / "run").iterdir()] == ["config.json"]


def test_a_write_killed_midway_leaves_the_old_config(tmp_path, monkeypatch):
  checkpoint.write_config(str(tmp_path), big_config(1))
  real_write = epath.Path.write_text

  def dies_halfway(self, text, *args, **kwargs):
    real_write(self, text[:len(text) // 2], *args, **kwargs)
    raise KeyboardInterrupt("killed during the write")

  monkeypatch.setattr(epath.Path, "write_text", dies_halfway)
  with pytest.raises(KeyboardInterrupt):
    checkpoint.write_config(str(tmp_path), big_config(2))
  monkeypatch.undo()
  assert checkpoint.load_config(str(tmp_path)).tag == 1


def test_damaged_config_is_a_clear_error(tmp_path):
  (tmp_path / "config.json").write_text('{"model": {"num_co')
  with pytest.raises(ValueError, match="config.json is not valid JSON"):
    checkpoint.load_config(str(tmp_path))


def test_training_summary_names_images_metrics_and_export(capsys):
  from cvqcar import logs

  text = logs.finished("runs/cvq_tiny", 600, "tokenizer training",
                       {"eval/psnr": 20.16})
  assert "finished at step 600: eval/psnr 20.16" in text
  assert "runs/cvq_tiny/images" in text
  assert ("python -m cvqcar.export --workdir=runs/cvq_tiny"
          " --out=exports/cvq_tiny") in text
  assert text in capsys.readouterr().out
