#!/usr/bin/env bash
# Runs training on this machine and restarts it after a crash or preemption; each restart
# resumes from the latest checkpoint in WORKDIR.
#
#   launch/run_local.sh configs/demo.py runs/demo [--config.field=value ...]
#
# MAX_RESTARTS (default 3) bounds the restarts. Status 2 is a refusal (a bad config, missing
# files, checkpoints of another model): rerunning cannot help, so it is not restarted. Exits with
# training's status.
set -uo pipefail
if [ $# -lt 2 ]; then
  echo "usage: $0 CONFIG WORKDIR [--config.field=value ...]" >&2
  exit 2
fi
config=$1 workdir=$2
shift 2
max_restarts=${MAX_RESTARTS:-3}
cd "$(dirname "$0")/.."
for attempt in $(seq 0 "$max_restarts"); do
  python -m fmboost_jax.train --config="$config" --workdir="$workdir" "$@"
  status=$?
  [ "$status" -eq 0 ] && exit 0
  if [ "$status" -eq 2 ]; then
    echo "training refused to run (status 2, the line above says why): not restarting" >&2
    exit 2
  fi
  echo "training exited with status $status (attempt $attempt of $max_restarts); resuming" >&2
done
exit "$status"
