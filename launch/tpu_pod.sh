#!/usr/bin/env bash
# Runs a config on every worker of a Cloud TPU VM pod, one process per host.
# Needs: gcloud with access to the TPU; TPU_NAME and ZONE (PROJECT optional);
# the repo and its venv in REMOTE_DIR on every worker (default cvqcar, from
# the home directory), which `setup` puts there: it copies this checkout's
# tracked and untracked-but-not-ignored files and pip-installs requirements.txt
# with jax[tpu] using REMOTE_PYTHON (default python3; needs >= 3.11).
# cvqcar.train calls jax.distributed.initialize(), which detects the pod, so no
# process flags are needed. The workdir must be shared by all workers: gs://.
# The run lives as long as this ssh session: start it inside tmux or screen.
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
where=(--zone="$ZONE" --worker=all)
if [ -n "${PROJECT:-}" ]; then
  where+=(--project="$PROJECT")
fi
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
# %q quoting survives the remote shell: values with spaces or quotes stay one
# argument each.
args=$(printf ' %q' --config="$config" --workdir="$workdir" "$@")
on_all_workers "cd $remote_dir && exec .venv/bin/python -m cvqcar.train$args"
