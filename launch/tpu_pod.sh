#!/usr/bin/env bash
# Runs a config on every worker of a Cloud TPU VM pod, one process per host.
# Needs: gcloud with access to the TPU; TPU_NAME and ZONE (PROJECT optional);
# the repo and its venv in REMOTE_DIR on every worker (default cvqcar, from
# the home directory), which `setup` puts there: it copies this checkout's
# tracked and untracked-but-not-ignored files and pip-installs requirements.txt
# with jax[tpu] using REMOTE_PYTHON (default python3; needs >= 3.11).
# cvqcar.train calls jax.distributed.initialize(), which detects the pod, so no
# process flags are needed. The workdir must be shared by all workers: gs://.
# The run lives as long as this script's ssh sessions: start it on the
# machine running gcloud inside tmux or screen, or with nohup (nohup
# launch/tpu_pod.sh ... > run.log 2>&1 &), so a closed terminal does not end it.
# Relaunching: the trainer exits 75 after saving a checkpoint on SIGTERM
# (cvqcar/exit_codes.py: a preemption or maintenance notice; on a pod every
# worker saves at the same step), and the same command resumes it. gcloud's
# ssh --worker=all waits for every worker and returns the first non-zero
# status in worker order (0 when all are 0); it retries a worker whose ssh
# connection fails (10 tries, 5 s apart, rerunning the command there) and
# then counts it as 255. So this script reruns the command while it sees 75
# or 255, at most MAX_RESTARTS times (default 100), each time after
# RESTART_WAIT seconds (default 60) and once the TPU is READY and not under
# maintenance (gcloud's ssh refuses it then), waiting at most READY_TIMEOUT
# seconds (default 3600; a deleted or reclaimed pod never gets there). It
# stops on 0 and on any other status, a real error: e.g. a worker that died
# without a notice (the others then fail JAX's coordination), or a relaunch
# that finds the old run still holding the workdir lock. Ctrl-C ends the
# loop and the ssh sessions; it sends the trainers no signal.
# Usage:
#   TPU_NAME=my-v5e-32 ZONE=us-west4-a launch/tpu_pod.sh setup
#   TPU_NAME=my-v5e-32 ZONE=us-west4-a launch/tpu_pod.sh \
#     configs/cvq_tokenizer.py gs://bucket/cvq256 [--config.FIELD=VALUE ...]
set -euo pipefail
usage() {
  local env="TPU_NAME=NAME ZONE=ZONE [PROJECT=P] [REMOTE_DIR=DIR]"
  echo "usage: $env $0 setup" >&2
  echo "       $env $0 CONFIG[:ARGS] WORKDIR [--config.FIELD=VALUE ...]" >&2
  exit 2
}
if [ $# -lt 1 ] || { [ "$1" != setup ] && [ $# -lt 2 ]; }; then
  usage
fi
if [ -z "${TPU_NAME:-}" ] || [ -z "${ZONE:-}" ]; then
  echo "$0: set TPU_NAME and ZONE (got TPU_NAME='${TPU_NAME:-}'" \
    "ZONE='${ZONE:-}')" >&2
  usage
fi
remote_dir=$(printf %q "${REMOTE_DIR:-cvqcar}")
node=(--zone="$ZONE")
if [ -n "${PROJECT:-}" ]; then
  node+=(--project="$PROJECT")
fi
where=("${node[@]}" --worker=all)
on_all_workers() {
  gcloud compute tpus tpu-vm ssh "$TPU_NAME" "${where[@]}" --command="$1"
}

if [ "$1" = setup ]; then
  root=$(cd "$(dirname "$0")/.." && pwd)
  tmp=$(mktemp -d)
  trap 'rm -rf "$tmp"' EXIT
  tarball=$tmp/cvqcar-src.tar.gz
  # Only what git would commit: no .venv, runs or caches.
  git -C "$root" ls-files -z --cached --others --exclude-standard |
    tar -C "$root" --null -T - -czf "$tarball"
  gcloud compute tpus tpu-vm scp "$tarball" "$TPU_NAME":cvqcar-src.tar.gz \
    "${where[@]}"
  python=$(printf %q "${REMOTE_PYTHON:-python3}")
  on_all_workers "set -e; mkdir -p $remote_dir; tar -xzf cvqcar-src.tar.gz \
-C $remote_dir; rm cvqcar-src.tar.gz; cd $remote_dir; \
[ -x .venv/bin/python ] || $python -m venv .venv; \
.venv/bin/pip install -q -r requirements.txt 'jax[tpu]'"
  exit 0
fi

config=$1 workdir=$2
shift 2
max_restarts=${MAX_RESTARTS:-100} restart_wait=${RESTART_WAIT:-60}
ready_timeout=${READY_TIMEOUT:-3600}
for value in "$max_restarts" "$restart_wait" "$ready_timeout"; do
  if ! [[ $value =~ ^[0-9]+$ ]]; then
    echo "$0: MAX_RESTARTS, RESTART_WAIT and READY_TIMEOUT must be whole" \
      "numbers (got '$max_restarts', '$restart_wait', '$ready_timeout')" >&2
    exit 2
  fi
done
# %q quoting survives the remote shell: values with spaces or quotes stay one
# argument each.
args=$(printf ' %q' --config="$config" --workdir="$workdir" "$@")
command="cd $remote_dir && exec .venv/bin/python -m cvqcar.train$args"
preempted=75  # cvqcar/exit_codes.py PREEMPTED
ssh_lost=255  # gcloud's status for a worker it could not reach or lost

wait_until_ready() {
  local waited=0 state
  while true; do
    sleep "$restart_wait"
    waited=$((waited + restart_wait))
    state=$(gcloud compute tpus tpu-vm describe "$TPU_NAME" "${node[@]}" \
      --format="value(state,health)" 2>/dev/null || echo "unknown")
    # A pod under maintenance refuses ssh (gcloud exits 1: a stop here).
    if [[ $state == READY* && $state != *UNHEALTHY_MAINTENANCE* ]]; then
      return 0
    fi
    if [ "$waited" -ge "$ready_timeout" ]; then
      echo "$0: $TPU_NAME is not READY after ${waited}s ($state):" \
        "stopped; run the same command to resume once it is" >&2
      return 1
    fi
    echo "$0: waiting for $TPU_NAME to be READY ($state)" >&2
  done
}

trap 'echo "$0: interrupted; not relaunching" >&2; exit 130' INT
trap 'echo "$0: terminated; not relaunching" >&2; exit 143' TERM
restarts=0
while true; do
  status=0
  on_all_workers "$command" || status=$?
  if [ "$status" -ne "$preempted" ] && [ "$status" -ne "$ssh_lost" ]; then
    if [ "$status" -ne 0 ]; then
      echo "$0: the run exited with status $status (not a preemption):" \
        "stopped after $restarts relaunches" >&2
    fi
    exit "$status"
  fi
  if [ "$restarts" -ge "$max_restarts" ]; then
    echo "$0: status $status again; stopped after $restarts relaunches" \
      "(MAX_RESTARTS=$max_restarts)" >&2
    exit "$status"
  fi
  restarts=$((restarts + 1))
  echo "$0: status $status (75: preempted with a checkpoint; 255: a worker's" \
    "ssh lost); relaunch $restarts of at most $max_restarts" >&2
  wait_until_ready || exit "$status"
done
