"""Tests of fmboost_jax/train/preemption.py: SIGTERM saves and exits 0; two processes joined by
`jax.distributed` on localhost stop at the same step and resume."""

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
def test_sigterm_saves_a_checkpoint_and_exits_with_status_zero(reference, tmp_path):
    workdir = tmp_path / "preempted"
    proc = start(workdir)
    wait_for_checkpoint(proc, workdir, 2)
    proc.send_signal(signal.SIGTERM)
    out = finish(proc)
    assert proc.returncode == 0, out[-3000:]
    assert "Preemption notice: saved step" in out
    stopped_at = steps(workdir)[-1]
    assert stopped_at < TOTAL, "the run finished before the signal arrived"
    assert not os.path.exists(workdir / "eval.json")  # stopped early, no final evaluation
    finish(start(workdir, FINAL_ONLY))
    assert max_diff(restore_params(str(workdir), use_ema=False), reference[0]) == 0.0


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
