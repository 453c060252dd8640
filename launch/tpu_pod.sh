#!/usr/bin/env bash
# Runs a config on every worker of a Cloud TPU VM pod, one process per host,
# detached from this machine: closing the terminal does not end the run.
# Needs: gcloud with access to the TPU, ZONE (PROJECT optional) and either
# TPU_NAME (one slice: `gcloud compute tpus tpu-vm ...`) or QUEUED_RESOURCE
# (a queued resource, one or more slices: `gcloud compute tpus
# queued-resources ... --node=all --worker=all`). With several slices set
# the cross-slice mesh too, e.g. --config.dcn_mesh.data=NUM_SLICES.
# cvqcar.train calls jax.distributed.initialize(), which detects the pod and
# its slices, so no process flags are needed. The workdir must be shared by
# all workers: gs://.
#
# `setup` ships the commit HEAD of this checkout (`git archive HEAD`: tracked
# files only, so no datasets, exports, runs or venvs; uncommitted edits are
# not shipped, and it says so) into REMOTE_DIR on every worker (default
# cvqcar, from the home directory), then builds REMOTE_DIR/.venv with uv:
# uv's standalone installer (when no uv is on PATH) puts uv in ~/.local/bin,
# `uv python install` fetches PYTHON_VERSION (default 3.12; jax >= 0.10.2
# needs >= 3.11, and the TPU VM image's python3 is 3.10), and `uv pip
# install -c constraints.txt -e ".[EXTRAS]"` installs the project with
# EXTRAS (default cpu,tpu: TensorFlow's CPU build for clu's writers and
# TFDS, and jax[tpu]). A venv of an older Python is replaced.
#
# A run starts the trainer on every worker under setsid and nohup, its output
# in REMOTE_DIR/logs/RUN_ID.log there (logs/latest.log points to it), and
# returns; each worker writes the trainer's status to logs/RUN_ID.status and
# copies its log into WORKDIR/logs/RUN_ID-HOST.log when the trainer ends.
# This script then waits on every worker for that status (an ssh connection
# per worker that polls every POLL_SECONDS, default 30), so a lost ssh
# connection loses nothing: it waits again. Ctrl-C ends this script only; the trainers
# go on (`logs` shows their last LOG_LINES lines, default 50; `stop` sends
# them SIGTERM: they save a checkpoint and exit 75, so end this script
# first, or it relaunches them).
# Relaunching: the trainer exits 75 after saving a checkpoint on SIGTERM
# (cvqcar/exit_codes.py: a preemption or maintenance notice; on a pod every
# worker saves at the same step), and the same command resumes it. gcloud's
# ssh --worker=all waits for every worker and returns the first non-zero
# status in worker order (0 when all are 0), and 255 for a worker it could
# not reach or lost. On 75 this script relaunches; on 253 too (a worker whose
# trainer vanished without a status: the VM was restarted); on 255 it waits
# for the statuses again. Each of these waits RESTART_WAIT seconds (default
# 60) and until the TPU is READY and not under maintenance (the queued
# resource ACTIVE), at most READY_TIMEOUT seconds (default 3600: a deleted
# or reclaimed pod never gets there), and counts towards MAX_RESTARTS
# (default 100). It stops on 0 and on any other status, a real error: e.g. a
# worker that died without a notice (the others then fail JAX's
# coordination), or a start that finds a trainer still running there (3).
# DRY_RUN=1 (or --dry_run first) prints the commands, one a line, and runs
# nothing.
# Usage:
#   TPU_NAME=my-v5e-32 ZONE=us-west4-a launch/tpu_pod.sh setup
#   TPU_NAME=my-v5e-32 ZONE=us-west4-a launch/tpu_pod.sh \
#     configs/cvq_tokenizer.py gs://bucket/cvq256 [--config.FIELD=VALUE ...]
#   QUEUED_RESOURCE=my-2x-v5e-256 ZONE=us-west4-a launch/tpu_pod.sh \
#     configs/cvq_tokenizer.py gs://bucket/cvq256 --config.dcn_mesh.data=2
#   TPU_NAME=my-v5e-32 ZONE=us-west4-a launch/tpu_pod.sh logs|stop
set -euo pipefail
usage() {
  local env="TPU_NAME=NAME|QUEUED_RESOURCE=NAME ZONE=ZONE [PROJECT=P]"
  env+=" [REMOTE_DIR=DIR] [DRY_RUN=1]"
  echo "usage: $env $0 setup|logs|stop" >&2
  echo "       $env $0 CONFIG[:ARGS] WORKDIR [--config.FIELD=VALUE ...]" >&2
  exit 2
}
dry_run=${DRY_RUN:-0}
if [ "${1:-}" = --dry_run ]; then
  dry_run=1
  shift
fi
case ${1:-} in
  setup | logs | stop) ;;
  *) if [ $# -lt 2 ]; then usage; fi ;;
esac
if [ -z "${ZONE:-}" ] || [ -z "${TPU_NAME:-}${QUEUED_RESOURCE:-}" ] ||
  { [ -n "${TPU_NAME:-}" ] && [ -n "${QUEUED_RESOURCE:-}" ]; }; then
  echo "$0: set TPU_NAME or QUEUED_RESOURCE (one of them), and ZONE (got" \
    "TPU_NAME='${TPU_NAME:-}' QUEUED_RESOURCE='${QUEUED_RESOURCE:-}'" \
    "ZONE='${ZONE:-}')" >&2
  usage
fi
remote_dir=$(printf %q "${REMOTE_DIR:-cvqcar}")
scope=(--zone="$ZONE")
if [ -n "${PROJECT:-}" ]; then
  scope+=(--project="$PROJECT")
fi
if [ -n "${TPU_NAME:-}" ]; then
  name=$TPU_NAME
  group=(compute tpus tpu-vm)
  where=("${scope[@]}" --worker=all)
else
  name=$QUEUED_RESOURCE
  group=(compute tpus queued-resources)
  where=("${scope[@]}" --node=all --worker=all)
fi

# quote and run (prints instead with dry_run=1).
# shellcheck source=launch/dry_run.sh
source "$(dirname "${BASH_SOURCE[0]}")/dry_run.sh"
on_all_workers() {
  run gcloud "${group[@]}" ssh "$name" "${where[@]}" --command="$1"
}
# True if the pid in file $1 is a live trainer started here (a pid from
# before a reboot may now be another program's). Expanded by the workers:
# shellcheck disable=SC2016
ours='ours() { local pid; pid=$(cat "$1" 2>/dev/null) && [ -n "$pid" ] &&
grep -q cvqcar.train "/proc/$pid/cmdline" 2>/dev/null; };'
ours=${ours//$'\n'/ }

if [ "$1" = setup ]; then
  root=$(cd "$(dirname "$0")/.." && pwd)
  tmp=$(mktemp -d)
  trap 'rm -rf "$tmp"' EXIT
  tarball=$tmp/cvqcar-src.tar.gz
  if [ -n "$(git -C "$root" status --porcelain --untracked-files=no)" ]; then
    echo "$0: uncommitted changes are not shipped: setup ships the commit" \
      "HEAD ($(git -C "$root" rev-parse --short HEAD))" >&2
  fi
  run git -C "$root" archive --format=tar.gz -o "$tarball" HEAD
  run gcloud "${group[@]}" scp "$tarball" "$name":cvqcar-src.tar.gz \
    "${where[@]}"
  python_version=${PYTHON_VERSION:-3.12}
  if ! [[ $python_version =~ ^3\.(1[1-9]|[2-9][0-9])(\.[0-9]+)?$ ]]; then
    echo "$0: PYTHON_VERSION=$python_version: jax needs Python >= 3.11" >&2
    exit 2
  fi
  extras=$(quote ".[${EXTRAS:-cpu,tpu}]")
  on_all_workers "set -e; mkdir -p $remote_dir; tar -xzf cvqcar-src.tar.gz \
-C $remote_dir; rm cvqcar-src.tar.gz; cd $remote_dir; \
export PATH=\"\$HOME/.local/bin:\$PATH\"; command -v uv >/dev/null || \
curl -LsSf https://astral.sh/uv/install.sh | env UV_NO_MODIFY_PATH=1 sh; \
uv python install $python_version; \
.venv/bin/python -c 'import sys; sys.exit(sys.version_info < (3, 11))' \
2>/dev/null || { rm -rf .venv; uv venv --seed --python $python_version \
.venv; }; uv pip install --python .venv/bin/python -q -c constraints.txt \
-e $extras"
  exit 0
fi
if [ "$1" = logs ]; then
  lines=$(printf %q "${LOG_LINES:-50}")
  on_all_workers "tail -n $lines $remote_dir/logs/latest.log | \
sed \"s/^/\$(hostname): /\""
  exit 0
fi
stop_command() {  # $1: the signal for every live trainer here
  echo "$ours cd $remote_dir || exit 1; for f in logs/*.pid; do if ours \"\$f\"; \
then echo \"\$(hostname): SIG$1 to \$(cat \"\$f\")\"; \
kill -$1 -- \"-\$(cat \"\$f\")\"; fi; done; true"
}
if [ "$1" = stop ]; then
  on_all_workers "$(stop_command TERM)"
  exit 0
fi

config=$1 workdir=$2
shift 2
max_restarts=${MAX_RESTARTS:-100} restart_wait=${RESTART_WAIT:-60}
ready_timeout=${READY_TIMEOUT:-3600} poll=${POLL_SECONDS:-30}
for value in "$max_restarts" "$restart_wait" "$ready_timeout" "$poll"; do
  if ! [[ $value =~ ^[0-9]+$ ]]; then
    echo "$0: MAX_RESTARTS, RESTART_WAIT, READY_TIMEOUT and POLL_SECONDS" \
      "must be whole numbers (got '$max_restarts', '$restart_wait'," \
      "'$ready_timeout', '$poll')" >&2
    exit 2
  fi
done
# %q quoting survives the remote shell: values with spaces or quotes stay one
# argument each.
train=".venv/bin/python -m cvqcar.train$(printf ' %q' --config="$config" \
  --workdir="$workdir" "$@")"
quoted_workdir=$(printf %q "${workdir%/}")
preempted=75  # cvqcar/exit_codes.py PREEMPTED
vanished=253  # a worker's trainer gone without a status (the VM restarted)
ssh_lost=255  # gcloud's status for a worker it could not reach or lost
stamp=$(date -u +%Y%m%d-%H%M%S)

start_command() {  # $1: the run id
  local log="logs/$1.log" status="logs/$1.status"
  # The detached shell outlives a SIGTERM (trap :) so that it records the
  # trainer's 75; it copies the log next to the checkpoints, then the status.
  local inner="trap : TERM; $train >> $log 2>&1; status=\$?; \
case $quoted_workdir in gs://*) gcloud storage cp $log \
$quoted_workdir/logs/$1-\$(hostname).log ;; *://*) ;; *) mkdir -p \
$quoted_workdir/logs && cp $log $quoted_workdir/logs/$1-\$(hostname).log \
;; esac >/dev/null 2>&1; echo \$status > $status.tmp && \
mv $status.tmp $status"
  echo "$ours cd $remote_dir || exit 1; mkdir -p logs || exit 1; \
for f in logs/*.pid; do if ours \"\$f\"; then \
echo \"\$(hostname): a trainer is running (\$f): tpu_pod.sh stop ends it\" \
>&2; exit 3; fi; done; echo \"\$(date -u) \$(hostname): $1\" > $log || exit 1; \
ln -sfn $1.log logs/latest.log; setsid nohup bash -c $(quote "$inner") \
</dev/null >/dev/null 2>&1 & echo \$! > logs/$1.pid"
}
wait_command() {  # $1: the run id
  local status="logs/$1.status"
  echo "$ours cd $remote_dir || exit 1; while [ ! -f $status ]; do \
if ! ours logs/$1.pid && [ ! -f $status ]; then \
echo \"\$(hostname): the trainer of $1 is gone without a status\" >&2; \
exit $vanished; fi; sleep $poll; done; exit \"\$(cat $status)\""
}

if [ -n "${TPU_NAME:-}" ]; then
  describe=(gcloud compute tpus tpu-vm describe "$name" "${scope[@]}"
    --format="value(state,health)")
else
  describe=(gcloud compute tpus queued-resources describe "$name"
    "${scope[@]}" --format="value(state.state)")
fi
wait_until_ready() {
  local waited=0 state
  while true; do
    sleep "$restart_wait"
    waited=$((waited + restart_wait))
    state=$("${describe[@]}" 2>/dev/null || echo "unknown")
    # A pod under maintenance refuses ssh (gcloud exits 1: a stop here).
    if [[ ($state == READY* && $state != *UNHEALTHY_MAINTENANCE*) ||
      $state == ACTIVE* ]]; then
      return 0
    fi
    if [ "$waited" -ge "$ready_timeout" ]; then
      echo "$0: $name is not READY after ${waited}s ($state):" \
        "stopped; run the same command to resume once it is" >&2
      return 1
    fi
    echo "$0: waiting for $name to be READY ($state)" >&2
  done
}

if [ "$dry_run" = 1 ]; then
  on_all_workers "$(start_command "$stamp-0")"
  on_all_workers "$(wait_command "$stamp-0")"
  exit 0
fi
trap 'echo "$0: interrupted; the trainers go on (logs, stop)" >&2; exit 130' \
  INT
trap 'echo "$0: terminated; the trainers go on (logs, stop)" >&2; exit 143' \
  TERM
restarts=0 attempt=0 action=start
while true; do
  status=0
  if [ "$action" = start ]; then
    run_id=$stamp-$attempt
    attempt=$((attempt + 1))
    echo "$0: starting $run_id on every worker" >&2
    on_all_workers "$(start_command "$run_id")" || status=$?
    if [ "$status" -eq "$ssh_lost" ]; then
      what="a worker's ssh lost while starting"
      action=restart
    elif [ "$status" -ne 0 ]; then
      echo "$0: the start exited with status $status: stopped" >&2
      exit "$status"
    else
      action=attach
      continue
    fi
  elif [ "$action" = restart ]; then
    # Some workers may have started: they would wait for the others forever.
    on_all_workers "$(stop_command KILL)" || true
    action=start
    continue
  else
    on_all_workers "$(wait_command "$run_id")" || status=$?
    case $status in
      0) exit 0 ;;
      "$preempted") what="preempted with a checkpoint" action=start ;;
      "$vanished") what="a worker restarted" action=start ;;
      "$ssh_lost") what="a worker's ssh lost; the run goes on" action=attach ;;
      *)
        echo "$0: the run exited with status $status (not a preemption):" \
          "stopped after $restarts relaunches" >&2
        exit "$status"
        ;;
    esac
  fi
  if [ "$restarts" -ge "$max_restarts" ]; then
    echo "$0: status $status again; stopped after $restarts relaunches" \
      "(MAX_RESTARTS=$max_restarts)" >&2
    exit "$status"
  fi
  restarts=$((restarts + 1))
  next="relaunch"
  if [ "$action" = attach ]; then
    next="waiting again, restart"
  fi
  echo "$0: status $status ($what); $next $restarts of at most" \
    "$max_restarts" >&2
  wait_until_ready || exit "$status"
done
