#!/usr/bin/env bash
# Cloud TPU VM pod slices: create, set up every worker, check, train on all workers, delete.
#
#   export TPU_NAME=fmboost ZONE=us-central2-b ACCELERATOR=v4-32 PROJECT=my-project
#   launch/tpu_pod.sh create                 # SPOT=1: a spot (preemptible) slice
#   launch/tpu_pod.sh setup                  # this checkout + a Python >= 3.11 venv on every worker
#   launch/tpu_pod.sh train configs/lhq.py gs://my-bucket/runs/lhq [--config.field=value ...]
#   launch/tpu_pod.sh logs                   # the last lines of every worker's log (-f: follow worker 0)
#   launch/tpu_pod.sh watch configs/lhq.py gs://my-bucket/runs/lhq [--config...]
#   launch/tpu_pod.sh delete
#   launch/tpu_pod.sh --dry-run COMMAND ...  # print every gcloud command instead of running it
#
# The runtime image follows the accelerator type (VERSION overrides it):
#   v6e-N -> v2-alpha-tpuv6e, v5p-N -> v2-alpha-tpuv5, v5litepod-N -> v2-alpha-tpuv5-lite,
#   v2/v3/v4-N -> tpu-ubuntu2204-base.
# Their system Python is older than the 3.11 this package needs, so `setup` makes a venv with uv
# (PYTHON_VERSION, default 3.12) in ~/fmboost_venv on every worker and installs `jax[tpu]`
# (JAX_SPEC), the requirements and this checkout there.
#
# `train` first runs a pre-flight on worker 0, in the foreground (`--preflight_devices`: the
# config loads and validates, the VAE and the data are reachable, the mesh and batch fit the
# slice's devices); only then does it start the run on all workers in the background (nohup),
# each logging to ~/train.log and writing its exit status to ~/train.status. The workdir, the
# data and the VAE should be on a bucket every worker reads (see docs/training.md). A rerun of
# `train` resumes from the latest checkpoint; `watch` does that after a preemption, recreating
# a spot slice, stops when a worker exited with status 2 (a refusal: restarting cannot help),
# and gives up after MAX_RESTARTS (default 5) restarts.
set -euo pipefail

DRY_RUN=0
if [ "${1:-}" = "--dry-run" ]; then DRY_RUN=1; shift; fi
ACCELERATOR=${ACCELERATOR:-v4-32}
PYTHON_VERSION=${PYTHON_VERSION:-3.12}
JAX_SPEC=${JAX_SPEC:-jax[tpu]>=0.6,<0.11}
VENV=${VENV:-fmboost_venv}              # on each worker, relative to its home
REMOTE_DIR=${REMOTE_DIR:-fmboost_jax}   # the checkout on each worker, relative to its home
MAX_RESTARTS=${MAX_RESTARTS:-5}
WATCH_SECONDS=${WATCH_SECONDS:-300}
ROOT="$(cd "$(dirname "$0")/.." && pwd)"

die() { echo "error: $*" >&2; exit 2; }

runtime_version() {   # accelerator type -> the TPU VM image its JAX runs on
  case "$1" in
    v6e-[0-9]*) echo v2-alpha-tpuv6e ;;
    v5p-[0-9]*) echo v2-alpha-tpuv5 ;;
    v5litepod-[0-9]*) echo v2-alpha-tpuv5-lite ;;
    v2-[0-9]*|v3-[0-9]*|v4-[0-9]*) echo tpu-ubuntu2204-base ;;
    *) return 1 ;;
  esac
}

num_devices() {   # JAX devices of a slice: TensorCores on v2/v3, chips (megacore) on v4/v5p
  local n=${1##*-}
  case "$1" in
    v4-*|v5p-*) echo $((n / 2)) ;;
    *) echo "$n" ;;
  esac
}

VERSION=${VERSION:-$(runtime_version "$ACCELERATOR")} || die "ACCELERATOR=$ACCELERATOR is not \
an accelerator type this script knows (v2-N, v3-N, v4-N, v5litepod-N, v5p-N, v6e-N); set VERSION \
to its runtime image to use it anyway"

run() {               # a gcloud command, or its printout with --dry-run
  if [ "$DRY_RUN" = 1 ]; then printf '%q ' "$@" | sed 's/ $/\n/'; else "$@"; fi
}
tpu() { run gcloud compute tpus tpu-vm "$@" --zone="$ZONE" ${PROJECT:+--project="$PROJECT"}; }
on_all() { tpu ssh "$TPU_NAME" --worker=all --command="$1"; }
on_worker0() { tpu ssh "$TPU_NAME" --worker=0 --command="$1"; }
need_slice() { : "${TPU_NAME:?set TPU_NAME}" "${ZONE:?set ZONE}"; }

create() {
  need_slice
  tpu create "$TPU_NAME" --accelerator-type="$ACCELERATOR" --version="$VERSION" ${SPOT:+--spot}
}

setup() {
  need_slice
  local archive
  archive=$(mktemp --suffix=.tar.gz)   # a clean copy of the tracked files (no venvs, runs, caches)
  git -C "$ROOT" archive --format=tar.gz -o "$archive" HEAD
  tpu scp "$archive" "$TPU_NAME":fmboost_jax.tar.gz --worker=all
  rm -f "$archive"
  on_all "set -e; cd ~ && rm -rf $REMOTE_DIR && mkdir -p $REMOTE_DIR && \
tar -xzf fmboost_jax.tar.gz -C $REMOTE_DIR && \
python3 -m pip install -q --upgrade --target ~/.fmboost_uv uv && \
~/.fmboost_uv/bin/uv venv -q --clear --python $PYTHON_VERSION $VENV && \
~/.fmboost_uv/bin/uv pip install -q --python $VENV/bin/python -r $REMOTE_DIR/requirements.txt \
'$JAX_SPEC' -e $REMOTE_DIR && $VENV/bin/python -c 'import fmboost_jax, sys; print(sys.version)'"
}

quoted() { local out="" a; for a in "$@"; do out+=" $(printf '%q' "$a")"; done; echo "$out"; }

preflight() {
  local config=$1 workdir=$2
  shift 2
  on_worker0 "cd ~/$REMOTE_DIR && ~/$VENV/bin/python -m fmboost_jax.train --config=$config \
--workdir=$workdir --preflight_devices=$(num_devices "$ACCELERATOR")$(quoted "$@")"
}

start_all() {
  local config=$1 workdir=$2
  shift 2
  # Only the nohup is put in the background ({ ... & }), so that ssh returns at once.
  on_all "cd ~/$REMOTE_DIR && rm -f ~/train.status && { nohup sh -c '~/$VENV/bin/python -m \
fmboost_jax.train --distributed=${DISTRIBUTED:-on} --config=$config --workdir=$workdir$(quoted "$@"); \
echo \$? > ~/train.status' > ~/train.log 2>&1 < /dev/null & }"
}

train() {
  need_slice
  local config=${1:?config file} workdir=${2:?workdir (gs://...)}
  if ! preflight "$@"; then
    echo "pre-flight on worker 0 failed (above): the run was not started" >&2
    exit 2
  fi
  start_all "$@"
}

logs() {
  need_slice
  if [ "${1:-}" = "-f" ]; then on_worker0 "tail -f ~/train.log"; return; fi
  on_all "echo \"== \$(hostname): status \$(cat ~/train.status 2>/dev/null || echo running)\"; \
tail -n ${LINES_PER_WORKER:-15} ~/train.log"
}

state() {   # READY, PREEMPTED, ...; MISSING only when gcloud says the slice does not exist
  local out
  if out=$(tpu describe "$TPU_NAME" --format='value(state)' 2>&1); then echo "$out"
  elif grep -qi "not_found\|not found" <<< "$out"; then echo MISSING
  else echo "UNKNOWN (gcloud: ${out//$'\n'/ })"
  fi
}

running() {   # 0: the run's processes are up on every worker, 1: not on some, 2: ssh failed
  local pattern="'[f]mboost_jax.train .*--workdir=$1'"   # [f]: must not match its own shell
  on_all "pgrep -f -- $pattern > /dev/null || exit 1" 2>/dev/null
  case $? in 0) return 0 ;; 1) return 1 ;; *) return 2 ;; esac
}

stop_all() {  # SIGTERM (the run saves and exits), then SIGKILL what is left after STOP_SECONDS
  local pattern="'[f]mboost_jax.train .*--workdir=$1'" waited=0
  on_all "pkill -f -- $pattern; true" || true
  while running "$1" && [ "$waited" -lt "${STOP_SECONDS:-120}" ]; do sleep 5; waited=$((waited + 5)); done
  on_all "pkill -9 -f -- $pattern; true" || true
}

watch() {
  need_slice
  local config=${1:?config file} workdir=${2:?workdir (gs://...)} restarts=0 statuses
  while [ "$DRY_RUN" = 1 ] || ! gcloud storage ls "$workdir/eval.json" > /dev/null 2>&1; do
    case "$(state)" in
      READY)
        statuses=$(on_all "cat ~/train.status 2>/dev/null || true" 2>/dev/null || true)
        if grep -qx 2 <<< "$statuses"; then
          echo "$(date) training refused to run (status 2; launch/tpu_pod.sh logs): not restarting" >&2
          exit 2
        fi
        local up=0
        running "$workdir" || up=$?
        if [ "$up" = 1 ]; then
          restarts=$((restarts + 1))
          if [ "$restarts" -gt "$MAX_RESTARTS" ]; then
            echo "$(date) training stopped $MAX_RESTARTS times: giving up (launch/tpu_pod.sh logs)" >&2
            exit 1
          fi
          echo "$(date) training not running on every worker: restart $restarts of $MAX_RESTARTS"
          stop_all "$workdir"
          train "$@"
        elif [ "$up" = 2 ]; then
          echo "$(date) workers unreachable over ssh: waiting"
        fi ;;
      MISSING|PREEMPTED|TERMINATED)
        echo "$(date) slice is $(state): recreating"
        tpu delete "$TPU_NAME" --quiet 2>/dev/null || true
        create && setup && train "$@" ;;
      *) echo "$(date) slice is $(state): waiting" ;;
    esac
    if [ "$DRY_RUN" = 1 ]; then return; fi
    sleep "$WATCH_SECONDS"
  done
  echo "$(date) done: $workdir/eval.json"
}

delete() { need_slice; tpu delete "$TPU_NAME" --quiet; }

cmd=${1:-}
shift || true
case "$cmd" in
  create|setup|train|logs|watch|delete) "$cmd" "$@" ;;
  *) sed -n '2,28p' "$0"; exit 2 ;;
esac
