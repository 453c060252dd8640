#!/usr/bin/env bash
# Submits a config as an xpk workload on a GKE TPU cluster (one or more slices).
# Needs: xpk (pip install xpk) and gcloud/kubectl access to the cluster; a
# DOCKER_IMAGE whose working directory is this repo with requirements.txt and
# jax[tpu] installed. Set CLUSTER, TPU_TYPE (e.g. v5litepod-256), DOCKER_IMAGE;
# NUM_SLICES (default 1), PROJECT and ZONE are optional. cvqcar.train calls
# jax.distributed.initialize(), which detects the GKE TPU job, so no process
# flags are needed. With NUM_SLICES > 1 set the cross-slice mesh too, e.g.
# --config.dcn_mesh.data=NUM_SLICES. The workdir must be a gs:// path.
# Usage:
#   CLUSTER=c TPU_TYPE=v5litepod-256 NUM_SLICES=2 DOCKER_IMAGE=gcr.io/p/cvqcar \
#     launch/xpk.sh cvq256-run1 configs/cvq_tokenizer.py gs://bucket/cvq256 \
#     --config.dcn_mesh.data=2 [--config.FIELD=VALUE ...]
set -euo pipefail
usage() {
  echo "usage: CLUSTER=C TPU_TYPE=T DOCKER_IMAGE=I [NUM_SLICES=N] [PROJECT=P]" \
    "[ZONE=Z] $0 WORKLOAD CONFIG[:ARGS] WORKDIR [--config.FIELD=VALUE ...]" >&2
  exit 2
}
if [ $# -lt 3 ]; then
  usage
fi
for var in CLUSTER TPU_TYPE DOCKER_IMAGE; do
  if [ -z "${!var:-}" ]; then
    echo "$0: set $var" >&2
    usage
  fi
done
workload=$1 config=$2 workdir=$3
shift 3
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
exec xpk workload create --cluster="$CLUSTER" --workload="$workload" \
  --tpu-type="$TPU_TYPE" --num-slices="${NUM_SLICES:-1}" \
  --docker-image="$DOCKER_IMAGE" ${optional[@]+"${optional[@]}"} \
  --command="python -m cvqcar.train$args"
