#!/usr/bin/env bash
# Submits a config as an xpk workload on a GKE TPU cluster (one or more slices).
# Needs: xpk (pip install xpk) and gcloud/kubectl access to the cluster; an
# image built from this repository's Dockerfile with JAX_EXTRA=tpu (/app
# holds the repo, installed with jax[tpu]), given one of two ways:
#   DOCKER_IMAGE=REGISTRY/NAME:TAG  an image in a registry the cluster pulls
#     from; with BUILD=1 (or --build) this script first builds it from this
#     checkout (docker build --build-arg JAX_EXTRA=tpu) and pushes it;
#   BASE_DOCKER_IMAGE=NAME  xpk's own route: xpk copies this checkout (what
#     .dockerignore lets through) onto /app of that image, e.g. one built
#     here with `docker build --build-arg JAX_EXTRA=tpu -t cvqcar-tpu .`,
#     and pushes the result to the project's registry.
# Set CLUSTER and TPU_TYPE (e.g. v5litepod-256); NUM_SLICES (default 1),
# PROJECT and ZONE are optional. cvqcar.train calls
# jax.distributed.initialize(), which detects the GKE TPU job, so no process
# flags are needed. With NUM_SLICES > 1 set the cross-slice mesh too, e.g.
# --config.dcn_mesh.data=NUM_SLICES. The workdir must be a gs:// path. The
# command runs `python3` (python images may have no `python`).
# DRY_RUN=1 (or --dry_run) prints the docker and xpk commands, one a line,
# and runs nothing.
# Usage:
#   CLUSTER=c TPU_TYPE=v5litepod-256 NUM_SLICES=2 DOCKER_IMAGE=gcr.io/p/cvqcar \
#     launch/xpk.sh [--build] cvq256-run1 configs/cvq_tokenizer.py \
#     gs://bucket/cvq256 --config.dcn_mesh.data=2 [--config.FIELD=VALUE ...]
set -euo pipefail
usage() {
  echo "usage: CLUSTER=C TPU_TYPE=T DOCKER_IMAGE=I|BASE_DOCKER_IMAGE=B" \
    "[NUM_SLICES=N] [PROJECT=P] [ZONE=Z] [BUILD=1] [DRY_RUN=1]" \
    "$0 [--build] [--dry_run] WORKLOAD CONFIG[:ARGS] WORKDIR" \
    "[--config.FIELD=VALUE ...]" >&2
  exit 2
}
dry_run=${DRY_RUN:-0} build=${BUILD:-0}
while [ $# -gt 0 ]; do
  case $1 in
    --dry_run) dry_run=1 ;;
    --build) build=1 ;;
    *) break ;;
  esac
  shift
done
if [ $# -lt 3 ]; then
  usage
fi
for var in CLUSTER TPU_TYPE; do
  if [ -z "${!var:-}" ]; then
    echo "$0: set $var" >&2
    usage
  fi
done
if [ -n "${DOCKER_IMAGE:-}" ] && [ -n "${BASE_DOCKER_IMAGE:-}" ] ||
  [ -z "${DOCKER_IMAGE:-}${BASE_DOCKER_IMAGE:-}" ]; then
  echo "$0: set DOCKER_IMAGE or BASE_DOCKER_IMAGE (one of them)" >&2
  usage
fi
if [ "$build" = 1 ] && [ -z "${DOCKER_IMAGE:-}" ]; then
  echo "$0: --build builds and pushes DOCKER_IMAGE: set it" >&2
  usage
fi
workload=$1 config=$2 workdir=$3
shift 3
root=$(cd "$(dirname "$0")/.." && pwd)

# quote and run (prints instead with dry_run=1).
# shellcheck source=launch/dry_run.sh
source "$(dirname "${BASH_SOURCE[0]}")/dry_run.sh"

if [ "$build" = 1 ]; then
  run docker build --build-arg JAX_EXTRA=tpu -t "$DOCKER_IMAGE" "$root"
  run docker push "$DOCKER_IMAGE"
fi
if [ -n "${DOCKER_IMAGE:-}" ]; then
  image=(--docker-image="$DOCKER_IMAGE")
else
  image=(--base-docker-image="$BASE_DOCKER_IMAGE" --script-dir="$root")
fi
optional=()
if [ -n "${PROJECT:-}" ]; then
  optional+=(--project="$PROJECT")
fi
if [ -n "${ZONE:-}" ]; then
  optional+=(--zone="$ZONE")
fi
# ${a[@]+...}: bash 3.2 (macOS) calls an empty array unbound under set -u.
# xpk runs --command in a shell in the container: %q keeps each argument one.
args=$(printf ' %q' --config="$config" --workdir="$workdir" "$@")
run xpk workload create --cluster="$CLUSTER" --workload="$workload" \
  --tpu-type="$TPU_TYPE" --num-slices="${NUM_SLICES:-1}" "${image[@]}" \
  ${optional[@]+"${optional[@]}"} --command="python3 -m cvqcar.train$args"
