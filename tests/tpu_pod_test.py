"""launch/tpu_pod.sh: its gcloud commands, the detached run, relaunches."""

import os
import shlex
import subprocess

import pytest
from launch_test import CONFIG, ROOT, dry_run_lines, fake_tool, run

from cvqcar.exit_codes import PREEMPTED


def remote_command(gcloud_args) -> str:
  commands = [a for a in gcloud_args if a.startswith("--command=")]
  assert len(commands) == 1, gcloud_args
  return commands[0].removeprefix("--command=")


POD = {"TPU_NAME": "pod", "ZONE": "us-west4-a"}


def test_tpu_pod_starts_the_trainer_detached_and_waits_for_its_status(
    tmp_path):
  env = {**fake_tool(tmp_path, "gcloud"), **POD}
  assert run(["bash", "launch/tpu_pod.sh", "configs/x.py"],
             env=env).returncode == 2  # no workdir
  start, wait = dry_run_lines(["bash", "launch/tpu_pod.sh", CONFIG,
                               "gs://b/run", "--config.data.data_dir=/my data"],
                              env)
  assert not (tmp_path / "gcloud.args").exists()  # printed, not run
  for line in (start, wait):
    assert line[:7] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "pod",
                        "--zone=us-west4-a"]
    assert "--worker=all" in line and "--node=all" not in line
  remote = remote_command(start)
  assert "cd cvqcar " in remote
  detached = remote[remote.index("setsid nohup bash -c "):]
  inner = shlex.split(detached)[4]  # the detached shell's script
  train = shlex.split(inner[:inner.index(" >> ")].removeprefix("trap : TERM;"))
  assert train == [".venv/bin/python", "-m", "cvqcar.train",
                   f"--config={CONFIG}", "--workdir=gs://b/run",
                   "--config.data.data_dir=/my data"]
  run_id = inner.split(" >> logs/")[1].split(".log")[0]
  assert f"gcloud storage cp logs/{run_id}.log gs://b/run/logs/" in inner
  assert detached.endswith(f"& echo $! > logs/{run_id}.pid")
  assert f"while [ ! -f logs/{run_id}.status ]" in remote_command(wait)


def test_tpu_pod_runs_multislice_through_a_queued_resource(tmp_path):
  env = {**fake_tool(tmp_path, "gcloud"), "QUEUED_RESOURCE": "qr",
         "ZONE": "us-west4-a", "PROJECT": "p"}
  for line in dry_run_lines(["bash", "launch/tpu_pod.sh", CONFIG,
                             "gs://b/run", "--config.dcn_mesh.data=2"], env):
    assert line[:9] == ["gcloud", "compute", "tpus", "queued-resources",
                        "ssh", "qr", "--zone=us-west4-a", "--project=p",
                        "--node=all"]
    assert line[9] == "--worker=all"
  _, scp, _ = dry_run_lines(["bash", "launch/tpu_pod.sh", "setup"], env)
  assert scp[:5] == ["gcloud", "compute", "tpus", "queued-resources", "scp"]
  assert scp[6:] == ["qr:cvqcar-src.tar.gz", "--zone=us-west4-a",
                     "--project=p", "--node=all", "--worker=all"]
  both = run(["bash", "launch/tpu_pod.sh", "setup"], env={**env, **POD})
  assert both.returncode == 2 and "one of them" in both.stderr


def test_tpu_pod_setup_ships_the_commit_and_installs_python_3_12(tmp_path):
  env = fake_gcloud(tmp_path, [])
  archive, scp, ssh = dry_run_lines(["bash", "launch/tpu_pod.sh", "setup"],
                                    env)
  assert archive[:4] == ["git", "-C", str(ROOT), "archive"]
  assert archive[-1] == "HEAD" and scp[5] == archive[-2]  # the tarball
  remote = remote_command(ssh)
  assert "curl -LsSf https://astral.sh/uv/install.sh" in remote
  assert "uv python install 3.12;" in remote
  assert "uv venv --seed --python 3.12 .venv" in remote
  # A venv of the image's python3 (3.10) is replaced, not reused.
  assert "sys.version_info < (3, 11)" in remote
  assert remote.endswith("uv pip install --python .venv/bin/python -q"
                         " -c constraints.txt -e '.[cpu,tpu]'")
  assert "python3 -m venv" not in remote
  old = run(["bash", "launch/tpu_pod.sh", "setup"],
            env={**env, "PYTHON_VERSION": "3.10"})
  assert old.returncode == 2 and "Python >= 3.11" in old.stderr
  # Run for real (gcloud faked): the tarball holds exactly the tracked files.
  out = run(["bash", "launch/tpu_pod.sh", "setup"], env=env)
  assert out.returncode == 0, out.stderr
  tracked = subprocess.run(["git", "ls-tree", "-r", "--name-only", "HEAD"],
                           cwd=ROOT, capture_output=True, text=True,
                           check=True).stdout.split()
  tarball = tmp_path / "shipped.tar.gz"
  assert tarball.exists()
  members = subprocess.run(["tar", "-tzf", tarball], capture_output=True,
                           text=True, check=True).stdout.split()
  assert sorted(m for m in members if not m.endswith("/")) == sorted(tracked)


def test_tpu_pod_logs_and_stop_reach_every_worker(tmp_path):
  env = {**fake_tool(tmp_path, "gcloud"), **POD, "LOG_LINES": "20"}
  [logs] = dry_run_lines(["bash", "launch/tpu_pod.sh", "logs"], env)
  assert remote_command(logs).startswith("tail -n 20 cvqcar/logs/latest.log")
  [stop] = dry_run_lines(["bash", "launch/tpu_pod.sh", "stop"], env)
  assert "--worker=all" in stop
  assert 'kill -TERM -- "-$(cat "$f")"' in remote_command(stop)


def fake_gcloud(tmp_path, wait_statuses, start_statuses=(),
                states=("READY\tHEALTHY",), execute=False):
  """A `gcloud` first on PATH. Its `ssh` appends start, wait, stop or other
  (what the remote command does) to ssh.calls and exits with the i-th of
  start_statuses / wait_statuses on the i-th start / wait (0 past their
  end), or, with `execute`, runs the remote command here in bash and exits
  with its status. `describe` prints states[j] on its j-th call (the last
  past their end) and counts itself in describe.calls; `scp` copies its
  source to shipped.tar.gz."""
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir(exist_ok=True)
  tool = bin_dir / "gcloud"
  tool.write_text(f"""#!/usr/bin/env bash
pick() {{  # pick KIND STATUS...: the status of this KIND's call
  local kind=$1; shift
  local statuses=("$@") n
  n=$(grep -c "^$kind$" {tmp_path}/ssh.calls)
  return "${{statuses[n - 1]:-0}}"
}}
case $4 in
  describe)
    echo >> {tmp_path}/describe.calls
    states=({" ".join(shlex.quote(s) for s in states)})
    n=$(wc -l < {tmp_path}/describe.calls)
    i=$(( n < ${{#states[@]}} ? n - 1 : ${{#states[@]}} - 1 ))
    printf '%s\n' "${{states[i]}}"
    exit 0 ;;
  scp) cp "$5" {tmp_path}/shipped.tar.gz; exit 0 ;;
esac
for arg in "$@"; do
  case $arg in --command=*) command=${{arg#--command=}}; esac
done
case $command in
  *"setsid nohup"*) kind=start ;;
  *"while [ ! -f"*) kind=wait ;;
  *"kill -"*) kind=stop ;;
  *) kind=other ;;
esac
echo "$kind" >> {tmp_path}/ssh.calls
if [ {int(execute)} = 1 ]; then
  bash -c "$command"
  exit
fi
case $kind in
  start) pick start {" ".join(map(str, start_statuses))} ;;
  wait) pick wait {" ".join(map(str, wait_statuses))} ;;
esac
""")
  tool.chmod(0o755)
  return {"PATH": f"{bin_dir}:{os.environ['PATH']}", **POD,
          "RESTART_WAIT": "0"}


def tpu_pod_run(tmp_path, env):
  """(result, the kinds of remote commands run, describe calls)."""
  out = run(["bash", "launch/tpu_pod.sh", CONFIG, "gs://b/run"], env=env,
            timeout=60)
  calls = (tmp_path / "ssh.calls").read_text().splitlines()
  describes = tmp_path / "describe.calls"
  n = len(describes.read_text().splitlines()) if describes.exists() else 0
  return out, calls, n


def test_tpu_pod_relaunches_after_a_preemption_or_a_restarted_worker(
    tmp_path):
  # 75: saved and stopped; 253: a worker's trainer vanished; then a finish.
  # The pod is under maintenance at the first look: the loop waits.
  env = fake_gcloud(tmp_path, [PREEMPTED, 253, 0],
                    states=["READY\tUNHEALTHY_MAINTENANCE", "READY\tHEALTHY"])
  out, calls, describes = tpu_pod_run(tmp_path, env)
  assert out.returncode == 0, out.stderr
  assert calls == ["start", "wait"] * 3
  assert describes == 3  # maintenance, READY; READY
  assert "relaunch 2 of at most 100" in out.stderr


def test_tpu_pod_waits_again_when_an_ssh_connection_is_lost(tmp_path):
  # 255 while waiting: the detached run goes on, so no second start.
  out, calls, _ = tpu_pod_run(tmp_path, fake_gcloud(tmp_path, [255, 0]))
  assert out.returncode == 0, out.stderr
  assert calls == ["start", "wait", "wait"]
  assert "waiting again, restart 1 of at most 100" in out.stderr


def test_tpu_pod_restarts_a_start_that_lost_a_worker(tmp_path):
  # 255 while starting: the workers that did start are killed first.
  out, calls, _ = tpu_pod_run(
      tmp_path, fake_gcloud(tmp_path, [0], start_statuses=[255, 0]))
  assert out.returncode == 0, out.stderr
  assert calls == ["start", "stop", "start", "wait"]
  other = tmp_path / "busy"  # a trainer still running there: a stop
  other.mkdir()
  busy, calls, _ = tpu_pod_run(
      other, fake_gcloud(other, [0], start_statuses=[3]))
  assert busy.returncode == 3 and calls[-1] == "start"


@pytest.mark.parametrize(("statuses", "runs"), [
    ([1, 0], 1), ([PREEMPTED, 1, 0], 2), ([0, 0], 1)])
def test_tpu_pod_stops_on_a_finish_or_a_real_error(tmp_path, statuses, runs):
  out, calls, _ = tpu_pod_run(tmp_path, fake_gcloud(tmp_path, statuses))
  assert out.returncode == statuses[runs - 1], out.stderr
  assert calls == ["start", "wait"] * runs
  if statuses[runs - 1]:
    assert "status 1 (not a preemption): stopped" in out.stderr


def test_tpu_pod_relaunches_at_most_max_restarts_times(tmp_path):
  env = fake_gcloud(tmp_path, [PREEMPTED] * 5)
  out, calls, _ = tpu_pod_run(tmp_path, {**env, "MAX_RESTARTS": "2"})
  assert out.returncode == PREEMPTED
  assert calls.count("start") == 3
  assert "stopped after 2 relaunches (MAX_RESTARTS=2)" in out.stderr
  bad = run(["bash", "launch/tpu_pod.sh", CONFIG, "gs://b/run"],
            env={**env, "MAX_RESTARTS": "many"})
  assert bad.returncode == 2 and "whole numbers" in bad.stderr


def test_tpu_pod_stops_when_the_pod_does_not_come_back(tmp_path):
  env = fake_gcloud(tmp_path, [PREEMPTED, 0], states=["PREEMPTED"])
  out, calls, describes = tpu_pod_run(tmp_path,
                                      {**env, "READY_TIMEOUT": "0"})
  assert out.returncode == PREEMPTED
  assert calls == ["start", "wait"] and describes == 1
  assert "not READY" in out.stderr and "PREEMPTED" in out.stderr


def test_tpu_pod_remote_commands_detach_log_and_report(tmp_path):
  # The remote commands run here (gcloud faked): the "trainer" is a script
  # that records its process group's leader (setsid makes it a new one) and
  # exits 75, then 0 on its second run.
  remote, workdir = tmp_path / "remote", tmp_path / "run"
  (remote / ".venv" / "bin").mkdir(parents=True)
  python = remote / ".venv" / "bin" / "python"
  python.write_text(f"""#!/usr/bin/env bash
echo "trainer $*"
cut -d" " -f5 /proc/$$/stat >> {tmp_path}/groups  # its process group
sleep 0.3
[ "$(wc -l < {tmp_path}/groups)" -ge 2 ] || exit {PREEMPTED}
""")
  python.chmod(0o755)
  env = fake_gcloud(tmp_path, [], execute=True)
  env.update(REMOTE_DIR=str(remote), POLL_SECONDS="1")
  out = run(["bash", "launch/tpu_pod.sh", CONFIG, str(workdir)], env=env,
            timeout=60)
  assert out.returncode == 0, out.stderr
  calls = (tmp_path / "ssh.calls").read_text().splitlines()
  assert calls == ["start", "wait"] * 2
  groups = (tmp_path / "groups").read_text().split()
  assert str(os.getpgid(0)) not in groups  # setsid: detached from ours
  assert len(set(groups)) == 2  # one new group a start
  statuses = sorted(p.read_text().strip()
                    for p in (remote / "logs").glob("*.status"))
  assert statuses == ["0", str(PREEMPTED)]
  latest = (remote / "logs" / "latest.log").read_text()
  assert (f"trainer -m cvqcar.train --config={CONFIG} --workdir={workdir}"
          in latest)
  copies = sorted((workdir / "logs").iterdir())
  assert len(copies) == 2 and "trainer" in copies[-1].read_text()


def test_tpu_pod_needs_its_environment():
  out = run(["bash", "launch/tpu_pod.sh", "setup"],
            env={"TPU_NAME": "", "ZONE": "", "QUEUED_RESOURCE": ""})
  assert out.returncode == 2
  assert "set TPU_NAME or QUEUED_RESOURCE" in out.stderr
