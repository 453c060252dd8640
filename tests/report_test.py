"""The report command: tables and plots rebuilt from run directories."""

import json
import os

import numpy as np
import pytest
from PIL import Image

from configs import cvq_tokenizer
from cvqcar import logs, report


def _fake_run(path, *, quantize="channel", k=1024, ema=False, alpha=0.0,
              usage=0.5, psnr=20.0, steps=400, eval_step=None,
              args="tiny,budget=64"):
  config = cvq_tokenizer.get_config(args)
  m = config.model
  m.quantize, m.codebook.ema = quantize, ema
  if m.quantizer == "vq":
    m.num_codes = k
  k = m.num_codes
  m.nested_dropout_alpha = alpha
  config.num_train_steps = steps
  os.makedirs(path)
  with open(os.path.join(path, "config.json"), "w") as f:
    f.write(config.to_json())
  log = logs.MetricsFile(str(path))
  for step in (100, 200, 300, 400):
    log.write(step, {"train/psnr": psnr - 4 + step / 100,
                     "train/latent_norm": 2.0, "train/codeword_norm": 8.0})
  kept = {f"eval/psnr_first_{n}": psnr - 6 + n / 16 for n in (4, 16, 64)}
  log.write(steps if eval_step is None else eval_step, {
      "eval/psnr": psnr, "eval/ssim": 0.5, "eval/codebook_usage": usage,
      "eval/codebook_perplexity": usage * k, "eval/images": 4 * k // 64,
      **kept})


def _rows(page, sweep):
  block = page.split(f"<!-- report:{sweep} -->")[1].split("<!-- /report")[0]
  return [[c.strip() for c in line.strip("|").split("|")]
          for line in block.splitlines() if line.startswith("| ")]


def test_report_rebuilds_tables_and_plots(tmp_path):
  root = tmp_path / "runs"
  usages = {}
  for i, (q, k, ema) in enumerate(
      [(q, k, e) for q in ("channel", "patch") for k in (1024, 65536)
       for e in (False, True)]):
    usages[q, k, ema] = (i + 1) / 10
    _fake_run(root / "budget" / f"{q}_{k}_{ema}", quantize=q, k=k, ema=ema,
              usage=(i + 1) / 10, psnr=18 + i)
  for alpha in (0.0, 0.5):
    _fake_run(root / "dropout" / f"a{alpha}", alpha=alpha, psnr=20 + alpha)
  _fake_run(root / "dropout" / "running", eval_step=200)
  out = tmp_path / "docs" / "results.md"
  out.parent.mkdir()
  out.write_text("# Results\n\nWritten by hand.\n")
  assert report.main(["--runs", str(root), "--out", str(out),
                      "--machine", "test box"]) == 0
  page = out.read_text()
  assert "Written by hand." in page  # text outside the blocks stays
  rows = _rows(page, "budget")
  header, body = rows[0], rows[1:]
  assert header[:3] == ["axis", "K", "quantizer"]  # the fields that vary
  assert len(body) == 8
  col = {name: i for i, name in enumerate(header)}
  for row in body:
    k = int(row[col["K"]].replace(",", ""))
    ema = row[col["quantizer"]] == "EMA + restart"
    want = usages[row[col["axis"]], k, ema]
    assert row[col["usage"]] == f"{want:.1%}"
    assert row[col["eval codes"]] == f"{4 * k:,}"
    assert row[col["tokens x dim"]] == "64 x 64"
    assert row[col["bits"]] == f"{64 * np.log2(k):,.0f}"
    assert row[col["PSNR gain, last 1/4"]] == "+1.00"
    assert row[col["token / codeword norm"]] == "2.00 / 8.00"
  # The unfinished run is named, not tabulated.
  assert len(_rows(page, "dropout")) == 1 + 2
  assert "Still training (not tabulated): running" in page
  assert "machine: test box" in page
  for png in ("budget_usage_vs_k.png", "dropout_psnr_vs_kept.png"):
    image = np.asarray(Image.open(out.parent / "results" / png))
    assert image.std() > 10, png  # a drawn plot, not one flat colour
    assert f"(results/{png})" in page
  # Running it again replaces the blocks instead of appending.
  assert report.main(["--runs", str(root), "--out", str(out)]) == 0
  assert out.read_text().count("<!-- report:budget -->") == 1


def test_report_plots_eval_psnr_against_steps_for_long_runs(tmp_path):
  root = tmp_path / "runs"
  for q, psnr in (("channel", 20.0), ("patch", 22.0)):
    _fake_run(root / "long" / q, quantize=q, psnr=psnr, steps=400)
    log = logs.MetricsFile(str(root / "long" / q))
    for step in (0, 100, 200):  # earlier evals than the last one
      log.write(step, {"eval/psnr": psnr - 3 + step / 100, "eval/ssim": 0.4,
                       "eval/codebook_usage": 0.5, "eval/images": 16,
                       "eval/codebook_perplexity": 8.0})
  out = tmp_path / "results.md"
  assert report.main(["--runs", str(root), "--out", str(out)]) == 0
  png = tmp_path / "results" / "long_psnr_vs_step.png"
  assert np.asarray(Image.open(png)).std() > 10
  assert "(results/long_psnr_vs_step.png)" in out.read_text()
  run = report.load_run(str(root / "long" / "patch"))
  assert sorted(run.evals) == [0, 100, 200, 400]
  assert run.eval["eval/psnr"] == 22.0  # the last eval is the one tabled


def test_report_names_every_quantizer_and_plots_equal_bits(tmp_path):
  root = tmp_path / "runs"
  runs = {  # config arguments -> (quantizer column, tokens x dim, bits)
      "tiny,budget=64,fsq": ("FSQ (7,5,5,5,5)", "64 x 64", "774"),
      "tiny,budget=16,rvq=4": ("RVQ x 4, EMA + restart", "16 x 4 codes x 16",
                               "768"),
      "tiny,budget=64,ibq": ("IBQ", "64 x 64", "768"),
      "tiny,budget=16,plain,rotation,kmeans": ("plain, rotation", "16 x 16",
                                               "192"),
      "tiny,budget=16,bsq": ("BSQ", "16 x 16", "192"),
  }
  for i, args in enumerate(runs):
    _fake_run(root / "zoo" / f"run{i}", args=args, psnr=18 + i, k=4096,
              ema="ema" in args or "rvq" in args)
  out = tmp_path / "results.md"
  assert report.main(["--runs", str(root), "--out", str(out)]) == 0
  rows = _rows(out.read_text(), "zoo")
  col = {name: i for i, name in enumerate(rows[0])}
  got = [(r[col["quantizer"]], r[col["tokens x dim"]], r[col["bits"]])
         for r in rows[1:]]
  assert set(got) == set(runs.values())
  bits = [int(b.replace(",", "")) for _, _, b in got]
  assert bits == sorted(bits)  # by budget first
  init = {r[col["quantizer"]]: r[col["init scale"]] for r in rows[1:]}
  assert init["plain, rotation"] == "k-means, 8 batches"
  assert init["IBQ"] == "0.1" and init["BSQ"] == "-"
  for png in ("zoo_psnr_vs_bits.png", "zoo_usage_vs_bits.png"):
    assert np.asarray(Image.open(tmp_path / "results" / png)).std() > 10


@pytest.mark.parametrize("breakage, message", [
    ("config", "no config.json"),
    ("line", "metrics.jsonl:2: not a metrics line"),
    ("no_eval", "no eval metrics"),
    ("missing_usage", "lacks eval/codebook_usage"),
    ("bad_config", "not a tokenizer config"),
])
def test_report_fails_clearly_on_a_malformed_run(tmp_path, capsys, breakage,
                                                  message):
  run = tmp_path / "runs" / "sweep" / "run"
  _fake_run(run)
  metrics = run / "metrics.jsonl"
  lines = metrics.read_text().splitlines()
  if breakage == "config":
    os.remove(run / "config.json")
  elif breakage == "line":
    lines[1] = '{"step": "two", "train/psnr": 1.0'
  elif breakage == "no_eval":
    lines = lines[:-1]
  elif breakage == "missing_usage":
    last = json.loads(lines[-1])
    del last["eval/codebook_usage"]
    lines[-1] = json.dumps(last)
  else:
    (run / "config.json").write_text(json.dumps({"model": {}}))
  metrics.write_text("\n".join(lines) + "\n")
  out = tmp_path / "results.md"
  assert report.main(["--runs", str(tmp_path / "runs"),
                      "--out", str(out)]) == 1
  err = capsys.readouterr().err
  assert err.startswith("report: ") and message in err
  assert len(err.strip().splitlines()) == 1
  assert not out.exists()
  with pytest.raises(ValueError, match="no run directory"):
    report.find_runs(str(tmp_path / "nowhere"))


def test_metrics_file_keeps_lines_on_resume_and_later_values_win(tmp_path):
  log = logs.MetricsFile(str(tmp_path))
  log.write(10, {"train/loss": 2.0})
  log.write(20, {"train/loss": 1.0})
  resumed = logs.MetricsFile(str(tmp_path))  # a restart after step 10
  resumed.write(20, {"train/loss": 1.5})
  steps = logs.read_metrics(str(tmp_path / logs.METRICS_FILE))
  assert steps == {10: {"train/loss": 2.0}, 20: {"train/loss": 1.5}}


def test_report_shows_dq_shares_beside_targets_and_plots_codes(tmp_path):
  root = tmp_path / "runs"
  for router in ("learned", "entropy"):
    for share in (0.25, 0.75):
      path = root / "dq" / f"{router}_{share}"
      _fake_run(path, quantize="dynamic", psnr=18 + 4 * share,
                args="tiny,budget=64,dynamic")
      config = json.loads((path / "config.json").read_text())
      config["model"]["dynamic"].update(router=router, fine_fraction=share)
      (path / "config.json").write_text(json.dumps(config))
      logs.MetricsFile(str(path)).write(400, {
          "eval/tokens": 16 + 48 * (share - 0.02),
          "eval/fine_share": share - 0.02})
  path = root / "dq3" / "three"
  _fake_run(path, quantize="dynamic", args="tiny,budget=64,dynamic=3")
  logs.MetricsFile(str(path)).write(400, {
      "eval/tokens": 30.0, "eval/fine_share": 0.29, "eval/medium_share": 0.31})
  out = tmp_path / "results.md"
  assert report.main(["--runs", str(root), "--out", str(out)]) == 0
  page = out.read_text()
  assert "fine 0.73, target 0.75" in page and "fine 0.23, target 0.25" in page
  assert "fine 0.29, target 0.30; medium 0.31, target 0.30" in page
  for what in ("psnr", "ssim"):
    png = tmp_path / "results" / f"dq_{what}_vs_tokens.png"
    assert np.asarray(Image.open(png)).std() > 10


def test_dq_name_reads_old_and_new_configs():
  assert report.dq_name({"quantize": "channel"}) == "-"
  old = {"quantize": "dynamic", "dynamic": {"fine_fraction": 0.5}}
  assert report.dq_name(old) == ("learned router, pooled coarse, 2 levels,"
                                 " fine 0.50")
  new = cvq_tokenizer.get_config("tiny,dynamic=3").model.to_dict()
  assert report.dq_name(new) == ("learned router, dual coarse, 3 levels,"
                                 " fine 0.30, medium 0.30")
