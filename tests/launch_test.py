"""Launchers: sweep expansion; slurm, xpk and the image's commands; shared
fakes (tests/tpu_pod_test.py and compile_check_test.py import them)."""

import os
import pathlib
import shlex
import shutil
import signal
import subprocess
import sys
import sysconfig
import time
import tomllib

import pytest

from cvqcar.exit_codes import PREEMPTED

ROOT = pathlib.Path(__file__).resolve().parents[1]
SWEEP = "configs/sweeps/codebook_size.py"
CONFIG = "configs/cvq_tokenizer.py:tiny"


def run(args, env=None, timeout=120):
  return subprocess.run(args, cwd=ROOT, capture_output=True, text=True,
                        env={**os.environ, **(env or {})}, timeout=timeout)


def sweep(*args, env=None):
  return run([sys.executable, "launch/sweep.py", *args], env=env)


def write_sweep(tmp_path, points):
  path = tmp_path / "my_sweep.py"
  path.write_text(f"def get_sweep():\n  return {{'config': {CONFIG!r},"
                  f" 'workdir_root': 'runs/x', 'points': {points!r}}}\n")
  return str(path)


def test_sweep_dry_run_is_one_command_per_point(tmp_path):
  out = sweep(f"--sweep={SWEEP}", "--dry_run", f"--workdir_root={tmp_path}")
  assert out.returncode == 0, out.stderr
  lines = out.stdout.splitlines()
  assert len(lines) == 3 * 2  # num_codes x quantizer
  workdirs = [shlex.split(line)[2] for line in lines]
  assert len(set(workdirs)) == 6
  name = "num_codes-1024_quantize-patch_nested_dropout_alpha-0.0"
  assert shlex.split(lines[3]) == [
      "launch/local.sh", CONFIG, f"{tmp_path}/{name}",
      "--config.model.num_codes=1024", "--config.model.quantize=patch",
      "--config.model.nested_dropout_alpha=0.0"]
  assert list(tmp_path.iterdir()) == []  # nothing ran


def test_sweep_slurm_and_tpu_pod_commands():
  slurm = sweep(f"--sweep={SWEEP}", "--dry_run", "--launcher=slurm")
  assert slurm.returncode == 0, slurm.stderr
  assert shlex.split(slurm.stdout.splitlines()[0]) == [
      "sbatch", "--job-name=codebook_size-num_codes-256_quantize-channel",
      "launch/slurm.sbatch", CONFIG,
      "runs/sweeps/codebook_size/num_codes-256_quantize-channel",
      "--config.model.num_codes=256", "--config.model.quantize=channel"]
  pod = sweep(f"--sweep={SWEEP}", "--dry_run", "--launcher=tpu_pod",
              "--workdir_root=gs://bucket/sweep/")
  assert pod.returncode == 0, pod.stderr
  first = shlex.split(pod.stdout.splitlines()[0])
  assert first[:3] == ["launch/tpu_pod.sh", CONFIG,
                       "gs://bucket/sweep/num_codes-256_quantize-channel"]


@pytest.mark.parametrize(("sweep_file", "config", "first"), [
    ("configs/sweeps/car_tiny.py", "configs/car_stage1.py:tiny",
     ["--config.eval_every=200", "--config.checkpoint_every=200",
      "--config.optimizer.learning_rate=0.0003", "--config.cfg_drop_prob=0.1"]),
    (None, "configs/dq_transformer.py:tiny",
     ["--config.model.width=64", "--config.cond_drop_prob=0.0"]),
])
def test_sweep_dry_run_of_car_and_dq_configs(tmp_path, sweep_file, config,
                                             first):
  # Their configs import `configs` (from configs import ...): sweep.py must
  # put the repo first on sys.path. `python -S` with only site-packages on
  # the path, from another directory: no installed copy of the repo helps.
  if sweep_file is None:
    sweep_file = tmp_path / "dq_sweep.py"
    sweep_file.write_text(
        f"def get_sweep():\n  return {{'config': {config!r}, 'points':"
        " [{'model.width': 64, 'cond_drop_prob': 0.0}]}\n")
  paths = sysconfig.get_paths()
  env = {**os.environ, "PYTHONPATH": os.pathsep.join(
      {paths["purelib"], paths["platlib"]})}
  out = subprocess.run(
      [sys.executable, "-S", str(ROOT / "launch/sweep.py"),
       f"--sweep={ROOT / sweep_file}", "--dry_run", "--launcher=tpu_pod",
       "--workdir_root=gs://b/sweep"],
      cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
  assert out.returncode == 0, out.stderr[-3000:]
  lines = [shlex.split(line) for line in out.stdout.splitlines()]
  assert lines[0][:2] == ["launch/tpu_pod.sh", config]
  assert lines[0][2].startswith("gs://b/sweep/") and lines[0][3:] == first
  assert len(lines) == (6 if "car_tiny" in str(sweep_file) else 1)


def test_sweep_renders_values_the_config_parser_reads_back(tmp_path):
  path = write_sweep(tmp_path, [{
      "model.channel_mults": (1, 2, 2), "model.codebook.ema": False,
      "data.data_dir": "/data/my tfds", "optimizer.learning_rate": 3e-4,
      "logical_axis_rules": (("conv_in", None), ("conv_out", "model"))}])
  out = sweep(f"--sweep={path}", "--dry_run")
  assert out.returncode == 0, out.stderr
  args = shlex.split(out.stdout)
  assert args[2] == ("runs/x/channel_mults-1-2-2_ema-False_data_dir-data-my-"
                     "tfds_learning_rate-0.0003_logical_axis_rules-conv_in-"
                     "None-conv_out-model")
  assert args[3:] == [
      "--config.model.channel_mults=(1,2,2)",
      "--config.model.codebook.ema=False",
      "--config.data.data_dir=/data/my tfds",
      "--config.optimizer.learning_rate=0.0003",
      "--config.logical_axis_rules=(('conv_in',None),('conv_out','model'))"]


def test_sweep_names_a_missing_field_and_its_point(tmp_path):
  path = write_sweep(tmp_path, [{"model.num_codes": 8},
                                {"model.codebook.emaa": True}])
  out = sweep(f"--sweep={path}", "--dry_run")
  assert out.returncode != 0
  assert "point 1 {'model.codebook.emaa': True}" in out.stderr
  assert "no field 'model.codebook.emaa'" in out.stderr
  assert out.stdout == ""


def test_sweep_rejects_a_value_of_the_wrong_type(tmp_path):
  path = write_sweep(tmp_path, [{"model.num_codes": "many"}])
  out = sweep(f"--sweep={path}", "--dry_run")
  assert out.returncode != 0
  assert "--config.model.num_codes=many" in out.stderr


def test_sweep_rejects_points_sharing_a_workdir(tmp_path):
  path = write_sweep(tmp_path, [{"model.num_codes": 8},
                                {"model.codebook.ema": True},
                                {"model.num_codes": 8}])
  out = sweep(f"--sweep={path}", "--dry_run")
  assert out.returncode != 0
  assert "points 0 and 2 both name their workdir 'num_codes-8'" in out.stderr


def test_local_sweep_runs_in_order_and_stops_at_first_failure(tmp_path):
  # launch/local.sh runs $PYTHON: `true` / `false` stand in for training.
  ok = sweep(f"--sweep={SWEEP}", f"--workdir_root={tmp_path}",
             env={"PYTHON": shutil.which("true")})
  assert ok.returncode == 0, ok.stderr
  assert [line.split()[0] for line in ok.stdout.splitlines()] == [
      f"[{i}/6]" for i in range(1, 7)]
  bad = sweep(f"--sweep={SWEEP}", f"--workdir_root={tmp_path}",
              env={"PYTHON": shutil.which("false")})
  assert bad.returncode != 0
  assert bad.stdout.startswith("[1/6]") and "[2/6]" not in bad.stdout
  assert "point 1/6 failed with exit code 1; stopped, 5 not run" in bad.stderr


SHELL_LAUNCHERS = ["launch/local.sh", "launch/tpu_pod.sh", "launch/xpk.sh",
                   "launch/slurm.sbatch"]


@pytest.mark.parametrize("script", SHELL_LAUNCHERS)
def test_shell_launcher_parses_and_prints_usage(script):
  assert run(["bash", "-n", script]).returncode == 0
  out = run(["bash", script])
  assert out.returncode == 2
  assert "usage:" in out.stderr


def fake_tool(tmp_path, name, statuses=()) -> dict[str, str]:
  """Puts an executable `name` first on PATH that records its arguments (NUL
  separated, in NAME.args), its environment (NAME.env) and
  JAX_LOCAL_DEVICE_IDS (in ids), and exits with statuses[i] on its i-th call
  (0 past their end)."""
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir(exist_ok=True)
  tool = bin_dir / name
  tool.write_text("#!/usr/bin/env bash\n"
                  f"printf '%s\\0' \"$@\" > {tmp_path}/{name}.args\n"
                  f"env > {tmp_path}/{name}.env\n"
                  f"echo \"${{JAX_LOCAL_DEVICE_IDS:-}}\" > {tmp_path}/ids\n"
                  f"echo >> {tmp_path}/{name}.calls\n"
                  f"statuses=({' '.join(map(str, statuses))})\n"
                  f"n=$(wc -l < {tmp_path}/{name}.calls)\n"
                  "exit \"${statuses[n - 1]:-0}\"\n")
  tool.chmod(0o755)
  return {"PATH": f"{bin_dir}:{os.environ['PATH']}"}


def recorded_args(tmp_path, name) -> list[str]:
  return (tmp_path / f"{name}.args").read_text().split("\0")[:-1]


def dry_run_lines(args, env) -> list[list[str]]:
  """The commands a launcher prints with DRY_RUN=1, each split as the shell
  would; the launcher must succeed."""
  out = run(args, env={**env, "DRY_RUN": "1"})
  assert out.returncode == 0, out.stderr
  return [shlex.split(line) for line in out.stdout.splitlines()]


XPK = {"CLUSTER": "c1", "TPU_TYPE": "v5litepod-16", "NUM_SLICES": "2",
       "DOCKER_IMAGE": "gcr.io/p/cvqcar:1", "BASE_DOCKER_IMAGE": ""}


def test_xpk_creates_one_workload(tmp_path):
  env = {**fake_tool(tmp_path, "xpk"), **XPK}
  out = run(["bash", "launch/xpk.sh", "run1", CONFIG, "gs://b/run",
             "--config.dcn_mesh.data=2"], env=env)
  assert out.returncode == 0, out.stderr
  args = recorded_args(tmp_path, "xpk")
  assert args == ["workload", "create", "--cluster=c1", "--workload=run1",
                  "--tpu-type=v5litepod-16", "--num-slices=2",
                  "--docker-image=gcr.io/p/cvqcar:1",
                  f"--command=python3 -m cvqcar.train --config={CONFIG}"
                  " --workdir=gs://b/run --config.dcn_mesh.data=2"]
  missing = run(["bash", "launch/xpk.sh", "run1", CONFIG, "gs://b/run"],
                env={**env, "DOCKER_IMAGE": ""})
  assert missing.returncode == 2
  assert "set DOCKER_IMAGE or BASE_DOCKER_IMAGE" in missing.stderr


def test_xpk_builds_the_tpu_image_or_lets_xpk_build_it(tmp_path):
  env = {**fake_tool(tmp_path, "xpk"), **fake_tool(tmp_path, "docker"),
         **XPK, "ZONE": "us-west4-a"}
  build, push, xpk = dry_run_lines(
      ["bash", "launch/xpk.sh", "--build", "run1", CONFIG, "gs://b/run"], env)
  assert build == ["docker", "build", "--build-arg", "JAX_EXTRA=tpu", "-t",
                   "gcr.io/p/cvqcar:1", str(ROOT)]
  assert push == ["docker", "push", "gcr.io/p/cvqcar:1"]
  assert xpk[7:] == ["--docker-image=gcr.io/p/cvqcar:1", "--zone=us-west4-a",
                     f"--command=python3 -m cvqcar.train --config={CONFIG}"
                     " --workdir=gs://b/run"]
  env.update(DOCKER_IMAGE="", BASE_DOCKER_IMAGE="cvqcar-tpu")
  [xpk] = dry_run_lines(["bash", "launch/xpk.sh", "run1", CONFIG,
                         "gs://b/run"], env)
  assert xpk[7:9] == ["--base-docker-image=cvqcar-tpu",
                      f"--script-dir={ROOT}"]
  assert not (tmp_path / "xpk.args").exists()  # printed, not run
  assert not (tmp_path / "docker.args").exists()


def test_dockerfile_installs_the_pyproject_extras_it_names():
  pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
  extras = pyproject["project"]["optional-dependencies"]
  assert "jax[tpu]" in extras["tpu"][0] and "jax[cuda12]" in extras["cuda"][0]
  dockerfile = (ROOT / "Dockerfile").read_text()
  assert "ARG JAX_EXTRA=cpu\n" in dockerfile
  assert 'pip install -c constraints.txt -e ".[$extras]"' in dockerfile
  assert "tpu | cuda) extras=\"cpu,$JAX_EXTRA\"" in dockerfile
  # jax >= 0.10.2 needs Python >= 3.11, as pyproject.toml says.
  assert pyproject["project"]["requires-python"] == ">=3.11"
  assert "ARG PYTHON_VERSION=3.12\nFROM python:${PYTHON_VERSION}-slim" in (
      dockerfile)


def test_dockerignore_keeps_run_outputs_and_venvs_out():
  ignored = (ROOT / ".dockerignore").read_text().split()
  for path in ("runs", "exports", "shards", "**/.venv*", ".git"):
    assert path in ignored
  # Every top-level directory git ignores stays out of the image too.
  for line in (ROOT / ".gitignore").read_text().splitlines():
    if line.startswith("/") and line.endswith("/"):
      assert line.strip("/") in ignored, line


def test_slurm_gives_each_node_process_all_its_gpus(tmp_path):
  env = fake_tool(tmp_path, "srun")
  env.update(SLURM_SUBMIT_DIR=str(ROOT), SLURM_GPUS_ON_NODE="4",
             JAX_LOCAL_DEVICE_IDS="")
  out = run(["bash", "launch/slurm.sbatch", CONFIG, "/shared/run",
             "--config.batch_size=64"], env=env)
  assert out.returncode == 0, out.stderr
  assert (tmp_path / "ids").read_text().strip() == "0,1,2,3"
  args = recorded_args(tmp_path, "srun")
  assert args == ["--kill-on-bad-exit=1", ".venv/bin/python", "-m",
                  "cvqcar.train", f"--config={CONFIG}", "--workdir=/shared/run",
                  "--config.batch_size=64"]
  elsewhere = run(["bash", "launch/slurm.sbatch", CONFIG, "/shared/run"],
                  env={**env, "SLURM_SUBMIT_DIR": str(tmp_path)})
  assert elsewhere.returncode == 2 and "not the cvqcar repo" in elsewhere.stderr


def sbatch_options() -> list[str]:
  return [line.removeprefix("#SBATCH ").strip()
          for line in (ROOT / "launch/slurm.sbatch").read_text().splitlines()
          if line.startswith("#SBATCH ")]


def test_slurm_asks_for_requeue_and_sigterm_before_the_limit():
  options = sbatch_options()
  assert "--requeue" in options
  signal = [o for o in options if o.startswith("--signal=")]
  # No "B:": the python processes (job steps) get it, not the batch shell.
  assert len(signal) == 1 and signal[0].startswith("--signal=TERM@"), signal
  assert int(signal[0].split("@")[1]) >= 60


def test_slurm_holds_whole_nodes_cpus_and_memory():
  options = sbatch_options()
  assert "--exclusive" in options and "--mem=0" in options
  [cpus] = [o for o in options if o.startswith("--cpus-per-task=")]
  assert int(cpus.split("=")[1]) >= 1


# Outside Slurm: no inherited allocation, and the conftest's XLA_FLAGS gone.
NO_SLURM = {"SLURM_SUBMIT_DIR": str(ROOT), "JAX_LOCAL_DEVICE_IDS": "",
            "SRUN_CPUS_PER_TASK": "", "XLA_FLAGS": "", "NCCL_DEBUG": "",
            "XLA_PYTHON_CLIENT_MEM_FRACTION": "", "SLURM_NTASKS_PER_NODE": "",
            "SLURM_TASKS_PER_NODE": "", "SLURM_GPUS_PER_TASK": ""}


def slurm_dry_run(tmp_path, **slurm) -> tuple[dict[str, str], list[str]]:
  """(the exports, the srun command) slurm.sbatch prints with DRY_RUN=1."""
  env = {**fake_tool(tmp_path, "srun"), **NO_SLURM, **slurm}
  lines = dry_run_lines(["bash", "launch/slurm.sbatch", CONFIG,
                         "/shared/run", "--config.batch_size=64"], env)
  assert not (tmp_path / "srun.args").exists()  # printed, not run
  exports = dict(line[1].split("=", 1) for line in lines[:-1]
                 if line[0] == "export")
  assert len(exports) == len(lines) - 1, lines
  return exports, lines[-1]


def test_slurm_one_process_a_node_gets_all_its_gpus_and_cpus(tmp_path):
  exports, srun = slurm_dry_run(
      tmp_path, SLURM_GPUS_ON_NODE="8", SLURM_CPUS_ON_NODE="96",
      SLURM_NTASKS_PER_NODE="1")
  assert exports == {
      "JAX_LOCAL_DEVICE_IDS": "0,1,2,3,4,5,6,7", "SRUN_CPUS_PER_TASK": "96",
      "XLA_FLAGS": "--xla_gpu_enable_latency_hiding_scheduler=true",
      "XLA_PYTHON_CLIENT_MEM_FRACTION": "0.9", "NCCL_DEBUG": "WARN"}
  assert srun == ["srun", "--kill-on-bad-exit=1", ".venv/bin/python", "-m",
                  "cvqcar.train", f"--config={CONFIG}",
                  "--workdir=/shared/run", "--config.batch_size=64"]


def test_slurm_one_process_a_gpu_sees_only_its_own(tmp_path):
  # --ntasks-per-node=8 --gpus-per-task=1: Slurm shows each its one GPU.
  exports, _ = slurm_dry_run(
      tmp_path, SLURM_GPUS_ON_NODE="8", SLURM_CPUS_ON_NODE="96",
      SLURM_NTASKS_PER_NODE="8", SLURM_GPUS_PER_TASK="gpu:1")
  assert exports["JAX_LOCAL_DEVICE_IDS"] == "0"
  assert exports["SRUN_CPUS_PER_TASK"] == "12"
  # Several processes that all see every GPU: jax picks $SLURM_LOCALID.
  exports, _ = slurm_dry_run(
      tmp_path, SLURM_GPUS_ON_NODE="8", SLURM_CPUS_ON_NODE="96",
      SLURM_TASKS_PER_NODE="8(x2)")
  assert "JAX_LOCAL_DEVICE_IDS" not in exports
  assert exports["SRUN_CPUS_PER_TASK"] == "12"


def test_slurm_keeps_the_users_settings(tmp_path):
  exports, _ = slurm_dry_run(
      tmp_path, SLURM_GPUS_ON_NODE="4", SLURM_CPUS_ON_NODE="64",
      JAX_LOCAL_DEVICE_IDS="1,2", SRUN_CPUS_PER_TASK="8",
      XLA_FLAGS="--xla_dump_to=/tmp/x", NCCL_DEBUG="INFO",
      XLA_PYTHON_CLIENT_MEM_FRACTION="0.5")
  assert exports == {
      "JAX_LOCAL_DEVICE_IDS": "1,2", "SRUN_CPUS_PER_TASK": "8",
      "XLA_FLAGS": "--xla_dump_to=/tmp/x"
                   " --xla_gpu_enable_latency_hiding_scheduler=true",
      "XLA_PYTHON_CLIENT_MEM_FRACTION": "0.5", "NCCL_DEBUG": "INFO"}
  off = "--xla_gpu_enable_latency_hiding_scheduler=false"
  exports, _ = slurm_dry_run(tmp_path, SLURM_GPUS_ON_NODE="1",
                             XLA_FLAGS=off)
  assert exports["XLA_FLAGS"] == off


def test_slurm_srun_gets_the_cpus_and_gpu_settings(tmp_path):
  env = {**fake_tool(tmp_path, "srun"), **NO_SLURM, "SLURM_GPUS_ON_NODE": "2",
         "SLURM_CPUS_ON_NODE": "32"}
  out = run(["bash", "launch/slurm.sbatch", CONFIG, "/shared/run"], env=env)
  assert out.returncode == 0, out.stderr
  seen = dict(line.split("=", 1) for line in
              (tmp_path / "srun.env").read_text().splitlines() if "=" in line)
  assert seen["SRUN_CPUS_PER_TASK"] == "32"
  assert seen["JAX_LOCAL_DEVICE_IDS"] == "0,1"
  assert "--xla_gpu_enable_latency_hiding_scheduler=true" in seen["XLA_FLAGS"]
  assert seen["NCCL_DEBUG"] == "WARN"


@pytest.mark.parametrize("status", [PREEMPTED, 0, 1])
def test_slurm_requeues_the_job_only_when_preempted(tmp_path, status):
  env = fake_tool(tmp_path, "srun", statuses=[status])
  env.update(fake_tool(tmp_path, "scontrol"))
  env.update(SLURM_SUBMIT_DIR=str(ROOT), SLURM_GPUS_ON_NODE="1",
             SLURM_JOB_ID="4242")
  out = run(["bash", "launch/slurm.sbatch", CONFIG, "/shared/run"], env=env)
  assert recorded_args(tmp_path, "srun")[1:4] == [
      ".venv/bin/python", "-m", "cvqcar.train"]
  if status == PREEMPTED:
    assert out.returncode == 0, out.stderr
    assert recorded_args(tmp_path, "scontrol") == ["requeue", "4242"]
  else:
    assert out.returncode == status, out.stderr
    assert not (tmp_path / "scontrol.args").exists()


def test_slurm_batch_shell_outlives_a_sigterm_until_srun_returns(tmp_path):
  # Slurm may SIGTERM the batch shell while the trainer saves: the shell
  # must wait for srun's status instead of dying (which ends the job).
  env = fake_tool(tmp_path, "scontrol")
  srun = tmp_path / "bin" / "srun"
  srun.write_text(f"#!/usr/bin/env bash\ntouch {tmp_path}/started\n"
                  f"sleep 1\nexit {PREEMPTED}\n")
  srun.chmod(0o755)
  env.update(SLURM_SUBMIT_DIR=str(ROOT), SLURM_GPUS_ON_NODE="1",
             SLURM_JOB_ID="4242")
  shell = subprocess.Popen(
      ["bash", "launch/slurm.sbatch", CONFIG, "/shared/run"], cwd=ROOT,
      env={**os.environ, **env}, stdout=subprocess.PIPE,
      stderr=subprocess.PIPE, text=True)
  deadline = time.monotonic() + 10
  while not (tmp_path / "started").exists() and time.monotonic() < deadline:
    time.sleep(0.02)
  shell.send_signal(signal.SIGTERM)
  _, stderr = shell.communicate(timeout=30)
  assert shell.returncode == 0, stderr
  assert "SIGTERM; waiting for the trainer" in stderr
  assert recorded_args(tmp_path, "scontrol") == ["requeue", "4242"]


def test_slurm_says_so_when_the_requeue_is_refused(tmp_path):
  env = fake_tool(tmp_path, "srun", statuses=[PREEMPTED])
  env.update(fake_tool(tmp_path, "scontrol", statuses=[1]))
  env.update(SLURM_SUBMIT_DIR=str(ROOT), SLURM_GPUS_ON_NODE="1",
             SLURM_JOB_ID="4242")
  out = run(["bash", "launch/slurm.sbatch", CONFIG, "/shared/run"], env=env)
  assert out.returncode == PREEMPTED
  assert "not requeued" in out.stderr and "resubmit" in out.stderr


@pytest.mark.parametrize("writes_marker", [True, False])
def test_slurm_trusts_the_preempted_file_over_a_killed_status(tmp_path,
                                                              writes_marker):
  # srun reports 143 for a process it killed while it was still exiting,
  # above another's 75: the run's WORKDIR/preempted.json decides. One left
  # by an earlier attempt must not requeue a crash.
  workdir = tmp_path / "run"
  workdir.mkdir()
  (workdir / "preempted.json").write_text("{}")  # an earlier attempt's
  env = fake_tool(tmp_path, "scontrol")
  srun = tmp_path / "bin" / "srun"
  body = f"echo '{{}}' > {workdir}/preempted.json\n" if writes_marker else ""
  srun.write_text(f"#!/usr/bin/env bash\n{body}exit 143\n")
  srun.chmod(0o755)
  env.update(SLURM_SUBMIT_DIR=str(ROOT), SLURM_GPUS_ON_NODE="1",
             SLURM_JOB_ID="4242")
  out = run(["bash", "launch/slurm.sbatch", CONFIG, str(workdir)], env=env)
  if writes_marker:
    assert out.returncode == 0, out.stderr
    assert recorded_args(tmp_path, "scontrol") == ["requeue", "4242"]
  else:
    assert out.returncode == 143, out.stderr
    assert not (tmp_path / "scontrol.args").exists()
