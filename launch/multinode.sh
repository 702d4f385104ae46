#!/usr/bin/env bash
# Multi-node (or multi-process) training without a scheduler: run this once on every node.
#
#   COORDINATOR=10.0.0.1:12345 NUM_PROCESSES=2 PROCESS_ID=0 launch/multinode.sh configs/lhq.py /shared/runs/lhq
#   COORDINATOR=10.0.0.1:12345 NUM_PROCESSES=2 PROCESS_ID=1 launch/multinode.sh configs/lhq.py /shared/runs/lhq
#
# COORDINATOR is host:port of process 0 (reachable from every node); each process drives all
# the GPUs it sees (restrict with CUDA_VISIBLE_DEVICES to run several processes per node).
# LOCAL_PROCESSES=N starts N processes on this machine instead, with ids PROCESS_ID..+N-1, and
# FAKE_CPU_DEVICES=K gives each K fake CPU devices: a multi-host run on one machine,
#
#   COORDINATOR=localhost:12345 NUM_PROCESSES=2 PROCESS_ID=0 LOCAL_PROCESSES=2 FAKE_CPU_DEVICES=4 \
#     launch/multinode.sh configs/demo.py runs/demo_2x4
set -euo pipefail
config=${1:?usage: launch/multinode.sh CONFIG WORKDIR [--config.field=value ...]}
workdir=${2:?usage: launch/multinode.sh CONFIG WORKDIR [--config.field=value ...]}
shift 2
: "${COORDINATOR:?set COORDINATOR=host:port of process 0}" "${NUM_PROCESSES:?set NUM_PROCESSES}"
: "${PROCESS_ID:?set PROCESS_ID}"
cd "$(dirname "$0")/.."
if [ -n "${FAKE_CPU_DEVICES:-}" ]; then
  export XLA_FLAGS="${XLA_FLAGS:-} --xla_force_host_platform_device_count=$FAKE_CPU_DEVICES"
fi
pids=()
for ((i = 0; i < ${LOCAL_PROCESSES:-1}; i++)); do
  python -m fmboost_jax.train --config="$config" --workdir="$workdir" \
    --coordinator_address="$COORDINATOR" --num_processes="$NUM_PROCESSES" \
    --process_id=$((PROCESS_ID + i)) "$@" &
  pids+=($!)
done
trap 'kill -TERM "${pids[@]}" 2>/dev/null' TERM INT
status=0
for pid in "${pids[@]}"; do wait "$pid" || status=$?; done
exit $status
