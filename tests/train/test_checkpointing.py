"""Scale-out and preemption: real training processes on fake CPU devices.

Every run is `python -m fmboost_jax.train` on the tiny pixel config, as a user would start it:
interrupted with SIGKILL or SIGTERM, resumed on another number of devices, and spread over two
processes joined by `jax.distributed` on localhost. Their final parameters are compared with one
uninterrupted single-device run of the same config.
"""

import os
import re
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from fmboost_jax.train.checkpointing import restore_params

from support import ROOT
TOTAL = 10
# Adam's eps bounds how much it amplifies float32 rounding noise in near-zero gradients
# (lr * noise / eps): with the default 1e-8 a sign flip of a 1e-9 gradient moves a parameter by
# a full lr, so runs on different meshes are compared with a larger eps.
BASE_FLAGS = ["--config=tests/tiny_config.py:flat", f"--config.total_steps={TOTAL}",
              "--config.checkpoint_every=1", "--config.log_every=1", "--config.optim.eps=1e-4",
              f"--config.eval_every={TOTAL}", "--config.keep_checkpoints=2"]


def _env(devices: int) -> dict[str, str]:
    return dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
                JAX_COMPILATION_CACHE_DIR=os.path.join(ROOT, "tests", ".jax_cache"),
                JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")


def _start(workdir, *flags, devices: int = 1) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "fmboost_jax.train", *BASE_FLAGS, f"--workdir={workdir}", *flags]
    return subprocess.Popen(cmd, cwd=ROOT, env=_env(devices), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def _finish(proc: subprocess.Popen, timeout: float = 300) -> str:
    out, _ = proc.communicate(timeout=timeout)
    return out


def _steps(workdir) -> list[int]:
    """Committed checkpoint steps (Orbax renames a step's directory to its number when done)."""
    ckpt = os.path.join(workdir, "checkpoints")
    return sorted(int(d) for d in os.listdir(ckpt) if d.isdigit()) if os.path.isdir(ckpt) else []


def _wait_for_checkpoint(proc, workdir, step: int, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while not any(s >= step for s in _steps(workdir)):
        assert proc.poll() is None, f"run ended before step {step}:\n{_finish(proc)[-3000:]}"
        assert time.time() < deadline, f"no checkpoint of step {step} after {timeout} s"
        time.sleep(0.05)


def _max_diff(a, b) -> float:
    return max(float(np.max(np.abs(x - y))) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """Final params and EMA params of an uninterrupted single-device run."""
    workdir = tmp_path_factory.mktemp("reference")
    out = _finish(_start(workdir))
    assert _steps(workdir)[-1] == TOTAL, out[-3000:]
    return restore_params(str(workdir), use_ema=False), restore_params(str(workdir))


@pytest.mark.slow
def test_a_run_killed_with_sigkill_and_resumed_ends_bitwise_equal(reference, tmp_path):
    workdir = tmp_path / "killed"
    proc = _start(workdir)
    _wait_for_checkpoint(proc, workdir, 3)
    proc.send_signal(signal.SIGKILL)                 # no chance to clean up, maybe mid-save
    _finish(proc)
    assert proc.returncode == -signal.SIGKILL
    killed_at = _steps(workdir)[-1]
    assert killed_at < TOTAL
    out = _finish(_start(workdir))                   # resumes from the latest complete step
    assert f"Restoring checkpoint of step {killed_at}" in out, out[-3000:]
    assert _steps(workdir)[-1] == TOTAL
    params, ema = reference
    # One device, same program, same batches and RNG: XLA on CPU is deterministic.
    assert _max_diff(restore_params(str(workdir), use_ema=False), params) == 0.0
    assert _max_diff(restore_params(str(workdir)), ema) == 0.0


@pytest.mark.slow
def test_sigterm_saves_a_checkpoint_and_exits_with_status_zero(reference, tmp_path):
    workdir = tmp_path / "preempted"
    proc = _start(workdir)
    _wait_for_checkpoint(proc, workdir, 2)
    proc.send_signal(signal.SIGTERM)
    out = _finish(proc)
    assert proc.returncode == 0, out[-3000:]
    assert "Preemption notice: saved step" in out
    stopped_at = _steps(workdir)[-1]
    assert stopped_at < TOTAL, "the run finished before the signal arrived"
    assert not os.path.exists(workdir / "eval.json")  # stopped early, no final evaluation
    _finish(_start(workdir))
    assert _max_diff(restore_params(str(workdir), use_ema=False), reference[0]) == 0.0


@pytest.mark.slow
def test_a_run_saved_on_8_devices_with_fsdp_resumes_on_4(reference, tmp_path):
    workdir = tmp_path / "reshard"
    fsdp = ["--config.fsdp_min_size=256"]
    out = _finish(_start(workdir, "--config.total_steps=4", "--config.mesh=(('data',2),('fsdp',4))",
                         *fsdp, devices=8))
    assert _steps(workdir)[-1] == 4, out[-3000:]
    out = _finish(_start(workdir, "--config.mesh=(('data',-1),('fsdp',2))", *fsdp, devices=4))
    assert "Restoring checkpoint of step 4" in out and "mesh {'data': 2, 'fsdp': 2}" in out, \
        out[-3000:]
    assert _steps(workdir)[-1] == TOTAL
    # Different meshes reduce in a different order: float32 rounding only.
    params = reference[0]
    scale = max(float(np.max(np.abs(p))) for p in jax.tree.leaves(params))
    assert _max_diff(restore_params(str(workdir), use_ema=False), params) <= 1e-4 * scale


@pytest.mark.slow
def test_two_processes_train_agree_on_a_preemption_step_and_resume(reference, tmp_path):
    """2 processes x 4 fake devices joined by jax.distributed on localhost; SIGTERM to one."""
    workdir = tmp_path / "multihost"

    def start(total: int) -> list[subprocess.Popen]:
        port = _free_port()
        return [_start(workdir, f"--config.total_steps={total}",
                       f"--coordinator_address=localhost:{port}", "--num_processes=2",
                       f"--process_id={i}", devices=4) for i in range(2)]

    procs = start(10 * TOTAL)
    _wait_for_checkpoint(procs[0], workdir, 2)
    procs[1].send_signal(signal.SIGTERM)              # the notice reaches one host only
    outs = [_finish(p) for p in procs]
    for p, o in zip(procs, outs):
        assert p.returncode == 0, o[-3000:]
    assert "Process 1 of 2" in outs[1] and "mesh {'data': 8, 'fsdp': 1} over 8 devices" in outs[0]
    stops = [re.findall(r"Preemption notice: saved step (\d+)", o) for o in outs]
    assert stops[0] == stops[1] and len(stops[0]) == 1, stops   # both stop at the same step
    stopped_at = int(stops[0][0])
    assert _steps(workdir)[-1] == stopped_at < TOTAL
    data_files = sorted(os.listdir(workdir / "checkpoints" / str(stopped_at) / "data"))
    assert [f for f in data_files if f.endswith(".json")] == ["process_0-of-2.json",
                                                              "process_1-of-2.json"]

    outs = [_finish(p) for p in start(TOTAL)]
    assert all(f"Restoring checkpoint of step {stopped_at}" in o for o in outs), outs[0][-3000:]
    assert _steps(workdir)[-1] == TOTAL
    params = reference[0]
    scale = max(float(np.max(np.abs(p))) for p in jax.tree.leaves(params))
    assert _max_diff(restore_params(str(workdir), use_ema=False), params) <= 1e-4 * scale
