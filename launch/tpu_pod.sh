#!/usr/bin/env bash
# Cloud TPU VM pod slices: create, set up every worker, train on all workers, delete.
#
#   export TPU_NAME=fmboost ZONE=us-central2-b ACCELERATOR=v4-32 PROJECT=my-project
#   launch/tpu_pod.sh create                 # add SPOT=1 for a spot (preemptible) slice
#   launch/tpu_pod.sh setup                  # copy this checkout to every worker, install it
#   launch/tpu_pod.sh train configs/lhq.py gs://my-bucket/runs/lhq [--config.field=value ...]
#   launch/tpu_pod.sh logs                   # follow worker 0's log
#   launch/tpu_pod.sh delete
#
# `train` starts `python -m fmboost_jax.train --distributed=on` on all workers at once, in the
# background (nohup), logging to ~/train.log on each worker. The workdir should be on a bucket
# every worker can reach; the run resumes from its latest checkpoint there, so rerunning
# `train` after a preemption (or `watch`, which does it for you) continues it. Data paths
# in the config (TFDS data_dir, latent records) should also be on the bucket or on each worker.
#
#   launch/tpu_pod.sh watch configs/lhq.py gs://my-bucket/runs/lhq
# recreates a preempted spot slice, sets it up and resumes training until the run is done
# (the run writes eval.json at the end).
set -euo pipefail
: "${TPU_NAME:?set TPU_NAME}" "${ZONE:?set ZONE}"
ACCELERATOR=${ACCELERATOR:-v4-32}
VERSION=${VERSION:-tpu-ubuntu2204-base}
PROJECT_FLAG=${PROJECT:+--project=$PROJECT}
REMOTE_DIR=${REMOTE_DIR:-fmboost_jax}
ROOT="$(cd "$(dirname "$0")/.." && pwd)"

tpu() { gcloud compute tpus tpu-vm "$@" --zone="$ZONE" $PROJECT_FLAG; }
on_all() { tpu ssh "$TPU_NAME" --worker=all --command="$1"; }

create() {
  tpu create "$TPU_NAME" --accelerator-type="$ACCELERATOR" --version="$VERSION" ${SPOT:+--spot}
}

setup() {
  # A clean copy of the tracked files (no virtualenvs, runs or caches).
  local archive
  archive=$(mktemp --suffix=.tar.gz)
  git -C "$ROOT" archive --format=tar.gz -o "$archive" HEAD
  tpu scp "$archive" "$TPU_NAME":/tmp/fmboost_jax.tar.gz --worker=all
  rm -f "$archive"
  on_all "rm -rf $REMOTE_DIR && mkdir -p $REMOTE_DIR && tar -xzf /tmp/fmboost_jax.tar.gz -C $REMOTE_DIR && \
    cd $REMOTE_DIR && python3 -m pip install -q -r requirements.txt 'jax[tpu]>=0.6,<0.11' gcsfs google-cloud-storage && \
    python3 -m pip install -q --no-deps -e ."
}

train() {
  local config=${1:?config file} workdir=${2:?workdir (gs://...)}
  shift 2
  local args=""
  for a in "$@"; do args+=" $(printf '%q' "$a")"; done
  on_all "cd $REMOTE_DIR && rm -f ~/train.status && nohup sh -c 'python3 -m fmboost_jax.train \
    --distributed=on --config=$config --workdir=$workdir$args; echo \$? > ~/train.status' \
    > ~/train.log 2>&1 &"
}

logs() { tpu ssh "$TPU_NAME" --worker=0 --command="tail -f ~/train.log"; }

state() { tpu describe "$TPU_NAME" --format='value(state)' 2>/dev/null || echo MISSING; }

watch() {
  local config=${1:?config file} workdir=${2:?workdir (gs://...)}
  until gsutil -q stat "$workdir/eval.json"; do
    case "$(state)" in
      READY)
        if [ "$(tpu ssh "$TPU_NAME" --worker=0 --command='cat ~/train.status 2>/dev/null')" = 2 ]; then
          echo "$(date) training refused to run (status 2; see ~/train.log on worker 0): not restarting" >&2
          exit 2
        fi
        if ! on_all "pgrep -f fmboost_jax.train > /dev/null" 2>/dev/null; then
          echo "$(date) training not running on every worker: (re)starting it"
          on_all "pkill -f fmboost_jax.train || true" || true
          train "$@"
        fi ;;
      MISSING|PREEMPTED|TERMINATED)
        echo "$(date) slice is $(state): recreating"
        tpu delete "$TPU_NAME" --quiet 2>/dev/null || true
        create && setup && train "$@" ;;
      *) echo "$(date) slice is $(state): waiting" ;;
    esac
    sleep 300
  done
  echo "$(date) done: $workdir/eval.json"
}

delete() { tpu delete "$TPU_NAME" --quiet; }

cmd=${1:-}
shift || true
case "$cmd" in
  create|setup|train|logs|watch|delete) "$cmd" "$@" ;;
  *) sed -n '2,21p' "$0"; exit 2 ;;
esac
