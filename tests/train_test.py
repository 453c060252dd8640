"""End to end: the real train function on a shrunken config, 8 CPU devices."""

import functools
import math
import pathlib
import subprocess
import sys

import jax
import numpy as np
import pytest
from absl import flags
from flax import nnx
from ml_collections import config_flags

from conftest import tiny_config
from cvqcar import checkpoint, sharding
from cvqcar.data import images as image_data
from cvqcar.tokenizer import export, lpips
from cvqcar.tokenizer import trainer as tokenizer_trainer

pytestmark = pytest.mark.slow
REPO = pathlib.Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
  """An uninterrupted 4-step run, shared by the tests below."""
  workdir = str(tmp_path_factory.mktemp("full"))
  return workdir, tokenizer_trainer.train_and_evaluate(tiny_config(), workdir)


def test_runs_on_all_devices_and_logs(finished_run):
  workdir, summary = finished_run
  assert jax.device_count() == 8
  assert summary.last_step == 4 and sorted(summary.train) == [1, 2, 3, 4]
  for step in summary.train.values():
    assert math.isfinite(step["train/loss"])
  assert 0 < summary.eval["eval/codebook_usage"] <= 1
  assert summary.eval["eval/psnr"] > 0
  assert {"eval/psnr_first_1", "eval/psnr_first_8"} <= set(summary.eval)
  images = sorted(p.name for p in (pathlib.Path(workdir) / "images").iterdir())
  assert images == ["recon_0000000.png", "recon_0000004.png"]


def test_interrupted_run_resumes_exactly(finished_run, tmp_path):
  _, full = finished_run
  config = tiny_config()
  config.run_steps = 2  # stop after two steps, as a preempted job would
  first = tokenizer_trainer.train_and_evaluate(config, str(tmp_path))
  assert first.last_step == 2
  config.run_steps = 0
  resumed = tokenizer_trainer.train_and_evaluate(config, str(tmp_path))
  assert sorted(resumed.train) == [3, 4]
  for step in (3, 4):
    np.testing.assert_allclose(resumed.train[step]["train/loss"],
                               full.train[step]["train/loss"], rtol=1e-6)
  np.testing.assert_allclose(resumed.eval["eval/psnr"],
                             full.eval["eval/psnr"], rtol=1e-5)


def test_export_load_encode_gives_the_trainers_tokens(finished_run, tmp_path):
  workdir, _ = finished_run
  out = export.export(workdir, str(tmp_path / "export"))
  loaded = export.load_tokenizer(out)
  config = tiny_config()
  trainer = tokenizer_trainer.Trainer(config)
  state = checkpoint.Checkpointer(workdir, config, read_only=True).restore(
      trainer.abstract_state)
  model = nnx.merge(trainer.setup.gen_graphdef, state.ema_params,
                    state.buffers)
  batch = next(iter(image_data.eval_dataset(config)))["image"]
  want = model.encode(batch)
  np.testing.assert_array_equal(loaded.encode(batch), want)
  assert want.shape == (8, 8)


def test_checkpoint_from_another_config_is_refused(finished_run, tmp_path):
  workdir, _ = finished_run
  config = tiny_config()
  config.model.latent_channels = 16
  with pytest.raises(ValueError, match=r"model.latent_channels: saved 8 vs"
                     r" now 16"):
    tokenizer_trainer.train_and_evaluate(config, workdir)
  out = export.export(workdir, str(tmp_path / "export"))
  with pytest.raises(ValueError, match="model.latent_channels"):
    export.load_tokenizer(out, expect=config)


def test_nan_guard_names_the_step(tmp_path):
  config = tiny_config()
  config.optimizer.learning_rate = float("nan")
  with pytest.raises(FloatingPointError, match="at step 2"):
    tokenizer_trainer.train_and_evaluate(config, str(tmp_path))


def test_gan_and_perceptual_losses_train(tmp_path):
  weights = str(tmp_path / "lpips.npz")
  lpips.LPIPS(rngs=nnx.Rngs(0)).save(weights)
  config = tiny_config()
  config.loss.gan_weight = 0.75
  config.loss.gan_start_step = 1  # step 0 runs without, later steps with
  config.loss.disc_base_channels = 8
  config.loss.disc_num_layers = 1
  config.loss.perceptual_weights = weights
  config.loss.perceptual_weight = 0.5  # tiny turns it off
  config.num_train_steps = 2
  trainer = tokenizer_trainer.Trainer(config)
  state = trainer.init()
  disc_before = jax.tree.map(np.asarray, state.disc_params)
  batches = iter(image_data.train_dataset(config))
  state, m0 = trainer.step(state, next(batches))
  state, m1 = trainer.step(state, next(batches))
  assert float(m0["d_loss"]) == 0.0  # before gan_start_step
  assert float(m1["d_loss"]) > 0.0 and float(m1["d_weight"]) > 0.0
  for k in ("loss", "g_loss", "nll"):
    assert math.isfinite(float(m1[k]))
  changed = jax.tree.map(lambda a, b: bool(np.any(a != np.asarray(b))),
                         disc_before, state.disc_params)
  assert all(jax.tree.leaves(changed))
  # LPIPS's 14.7M weights are a step argument, not constants in the program.
  step = functools.partial(tokenizer_trainer.train_step, config=config,
                           setup=trainer.setup)
  batch = next(batches)
  jaxpr = jax.make_jaxpr(step)(state, batch, trainer.step_key,
                               trainer.perceptual)
  assert sum(np.size(c) for c in jaxpr.consts) < 10_000
  lpips_size = sum(x.size for x in jax.tree.leaves(trainer.perceptual))
  assert lpips_size > 14e6


def test_eval_counts_every_image_once(tmp_path):
  config = tiny_config()
  config.data.num_eval_images = 20  # two batches of 8 and a padded one
  trainer = tokenizer_trainer.Trainer(config)
  state = trainer.init()
  result, first = trainer.evaluate(state, image_data.eval_batches(config))
  assert result["eval/images"] == 20
  assert first["image"].shape[0] == config.eval_batch_size


def test_mesh_must_match_devices():
  config = tiny_config()
  config.mesh.data = 3
  with pytest.raises(ValueError, match="needs 3 devices, found 8"):
    sharding.make_mesh(config)


def test_unknown_config_key_is_named():
  fv = flags.FlagValues()
  config_flags.DEFINE_config_file("config", None, "", flag_values=fv,
                                  lock_config=True)
  with pytest.raises(flags.UnrecognizedFlagError, match="config.model.nope"):
    fv(["prog", "--config=configs/cvq_tokenizer.py:tiny",
        "--config.model.nope=1"])
  with pytest.raises(flags.IllegalFlagValueError,
                     match=r"unknown config argument\(s\) \['bogus'\]"):
    fv(["prog", "--config=configs/cvq_tokenizer.py:tiny,bogus"])


def test_pallas_codebook_search_in_the_sharded_step():
  """The fused kernel (interpreted on CPU) runs per shard inside the jitted
  8-device train step and gives the blocked XLA path's losses."""
  losses = {}
  for impl in ("xla", "pallas"):
    config = tiny_config()
    config.model.codebook.argmin_impl = impl
    trainer = tokenizer_trainer.Trainer(config)
    state = trainer.init()
    batches = iter(image_data.train_dataset(config))
    for _ in range(2):
      state, m = trainer.step(state, next(batches))
    losses[impl] = float(m["loss"])
  np.testing.assert_allclose(losses["pallas"], losses["xla"], rtol=1e-5)


def test_relative_workdir(tmp_path, monkeypatch):
  """The README's quick start passes a relative workdir."""
  monkeypatch.chdir(tmp_path)
  config = tiny_config()
  config.num_train_steps = 2
  summary = tokenizer_trainer.train_and_evaluate(config, "runs/rel")
  assert summary.last_step == 2
  assert (tmp_path / "runs" / "rel" / "checkpoints" / "2").is_dir()


@pytest.mark.parametrize("args, message", [
    (["--config=configs/nope.py"], "train: no config file 'configs/nope.py'"),
    (["--config=configs/cvq_tokenizer.py:tiny", "--config.model.nope=1"],
     "train: the config has no field 'nope' (--config.model.nope)"),
    (["--config=configs/cvq_tokenizer.py:tiny,bogus"],
     "unknown config argument(s) ['bogus']"),
])
def test_config_errors_are_one_line_before_anything_starts(args, message,
                                                           tmp_path):
  out = subprocess.run(
      [sys.executable, "-m", "cvqcar.train", *args,
       f"--workdir={tmp_path / 'run'}"], cwd=REPO, capture_output=True,
      text=True, timeout=300)
  assert out.returncode != 0
  lines = out.stderr.strip().splitlines()
  assert len(lines) == 1 and message in lines[0], out.stderr
  assert not (tmp_path / "run").exists()  # nothing started
