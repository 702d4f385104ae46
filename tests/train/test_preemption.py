"""Tests of fmboost_jax/train/preemption.py across hosts: two processes joined by
`jax.distributed` on localhost stop at the same step and resume (one process's SIGTERM is the
start of tests/checkpoints/test_store.py's soak)."""

import os
import re
import signal
import subprocess

import jax
import numpy as np
import pytest
from training_runs import (
    FINAL_ONLY,
    TOTAL,
    finish,
    free_port,
    max_diff,
    start,
    steps,
    wait_for_checkpoint,
)

from fmboost_jax.checkpoints.store import restore_params


@pytest.mark.slow
def test_two_processes_train_agree_on_a_preemption_step_and_resume(reference, tmp_path):
    """2 processes x 2 fake devices joined by jax.distributed on localhost; SIGTERM to one."""
    workdir = tmp_path / "multihost"

    def start_both(total: int, *flags: str) -> list[subprocess.Popen]:
        port = free_port()
        return [start(workdir, f"--config.total_steps={total}", *flags,
                       f"--coordinator_address=localhost:{port}", "--num_processes=2",
                       f"--process_id={i}", devices=2) for i in range(2)]

    procs = start_both(10 * TOTAL)
    wait_for_checkpoint(procs[0], workdir, 2)
    procs[1].send_signal(signal.SIGTERM)              # the notice reaches one host only
    outs = [finish(p) for p in procs]
    for p, o in zip(procs, outs):
        assert p.returncode == 0, o[-3000:]
    assert "Process 1 of 2" in outs[1] and "mesh {'data': 4, 'fsdp': 1} over 4 devices" in outs[0]
    stops = [re.findall(r"Preemption notice: saved step (\d+)", o) for o in outs]
    assert stops[0] == stops[1] and len(stops[0]) == 1, stops   # both stop at the same step
    stopped_at = int(stops[0][0])
    assert steps(workdir)[-1] == stopped_at < TOTAL
    data_files = sorted(os.listdir(workdir / "checkpoints" / str(stopped_at) / "data"))
    assert [f for f in data_files if f.endswith(".json")] == ["process_0-of-2.json",
                                                              "process_1-of-2.json"]

    outs = [finish(p) for p in start_both(TOTAL, FINAL_ONLY)]
    assert all(f"Restoring checkpoint of step {stopped_at}" in o for o in outs), outs[0][-3000:]
    assert steps(workdir)[-1] == TOTAL
    params = reference[0]
    scale = max(float(np.max(np.abs(p))) for p in jax.tree.leaves(params))
    assert max_diff(restore_params(str(workdir), use_ema=False), params) <= 1e-4 * scale
