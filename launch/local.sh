#!/usr/bin/env bash
# Runs a config on this machine's devices (CPU, one GPU host or one TPU VM).
# Needs: the venv from the README quick start.
# Usage: launch/local.sh configs/cvq_tokenizer.py:tiny runs/cvq_tiny [--config.FIELD=VALUE ...]
set -euo pipefail
if [ $# -lt 2 ]; then
  echo "usage: $0 CONFIG[:ARGS] WORKDIR [--config.FIELD=VALUE ...]" >&2
  exit 2
fi
config=$1 workdir=$2
shift 2
root=$(cd "$(dirname "$0")/.." && pwd)
python=${PYTHON:-$root/.venv/bin/python}
cd "$root"
exec "$python" -m cvqcar.train --config="$config" --workdir="$workdir" "$@"
