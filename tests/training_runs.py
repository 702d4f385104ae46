"""Real training processes for the checkpoint and preemption tests: `python -m fmboost_jax.train`
on the tiny pixel config, as a user would start it, on fake CPU devices."""

import os
import socket
import subprocess
import sys
import time

import jax
import numpy as np
from support import ROOT, devices_env

TOTAL = 10
FINAL_ONLY = f"--config.checkpoint_every={TOTAL}"   # a run to the end saves once, there
EVERY_STEP = "--config.checkpoint_every=1"         # the soak: its kills land mid-save


# A checkpoint every other step (each save of this tiny state costs about 0.7 s of Orbax's
# fixed work); the soak saves every step, so that its kills land mid-save.
# Adam's eps bounds how much it amplifies float32 rounding noise in near-zero gradients
# (lr * noise / eps): with the default 1e-8 a sign flip of a 1e-9 gradient moves a parameter by
# a full lr, so runs on different meshes are compared with a larger eps.
BASE_FLAGS = ["--config=tests/tiny_config.py:flat", f"--config.total_steps={TOTAL}",
              "--config.checkpoint_every=2", "--config.log_every=1", "--config.optim.eps=1e-4",
              f"--config.eval_every={TOTAL}", "--config.keep_checkpoints=2"]


def env(devices: int) -> dict[str, str]:
    return devices_env(devices, JAX_COMPILATION_CACHE_DIR=os.path.join(ROOT, "tests", ".jax_cache"),
                       JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")


def start(workdir, *flags, devices: int = 1) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "fmboost_jax.train", *BASE_FLAGS, f"--workdir={workdir}", *flags]
    return subprocess.Popen(cmd, cwd=ROOT, env=env(devices), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def finish(proc: subprocess.Popen, timeout: float = 300) -> str:
    out, _ = proc.communicate(timeout=timeout)
    return out


def steps(workdir) -> list[int]:
    """Committed checkpoint steps (Orbax renames a step's directory to its number when done)."""
    ckpt = os.path.join(workdir, "checkpoints")
    return sorted(int(d) for d in os.listdir(ckpt) if d.isdigit()) if os.path.isdir(ckpt) else []


def wait_for_checkpoint(proc, workdir, step: int, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while not any(s >= step for s in steps(workdir)):
        assert proc.poll() is None, f"run ended before step {step}:\n{finish(proc)[-3000:]}"
        assert time.time() < deadline, f"no checkpoint of step {step} after {timeout} s"
        time.sleep(0.05)


def max_diff(a, b) -> float:
    return max(float(np.max(np.abs(x - y))) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]
