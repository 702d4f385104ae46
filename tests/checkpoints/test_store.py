"""Tests of fmboost_jax/checkpoints/store.py: a run killed at six random moments resumes
bitwise equal, a run saved on 4 devices with FSDP resumes on 2, and the retention policy."""

import random
import signal
import time

import jax
import numpy as np
import pytest
from training_runs import TOTAL, finish, max_diff, start, steps

from fmboost_jax.checkpoints.store import restore_params

KILLS = 6


def read_until(proc, marker: str, timeout: float = 120) -> bool:
    """Reads the run's output until a line holds `marker` (True) or the run ends (False)."""
    deadline = time.time() + timeout
    for line in proc.stdout:
        if marker in line:
            return True
        assert time.time() < deadline, f"no {marker!r} after {timeout} s"
    return False


@pytest.mark.slow
def test_a_run_killed_at_six_random_moments_resumes_and_ends_bitwise_equal(reference, tmp_path):
    """SIGKILL (no clean-up) at seeded random moments: three attempts during start-up (imports,
    compilation, restoring), three during training, where a checkpoint is saved asynchronously
    every step, so those kills land mid-save."""
    rng = random.Random(0)
    workdir = tmp_path / "soak"
    progress = []                            # the latest complete step after each attempt
    for attempt in range(KILLS):
        done = progress[-1] if progress else 0
        proc = start(workdir)
        if attempt % 2 and done < TOTAL - 2:            # every other one: just after a step's log
            read_until(proc, f"step {done + 1}/")
            time.sleep(rng.uniform(0.0, 0.3))
        else:
            time.sleep(rng.uniform(0.2, 4.0))
        proc.send_signal(signal.SIGKILL)
        output = finish(proc)
        assert proc.returncode in (0, -signal.SIGKILL), output[-3000:]
        progress.append(steps(workdir)[-1] if steps(workdir) else 0)
        if progress[-1] == TOTAL:
            break
    assert len(progress) == KILLS, progress                        # all kills before the end
    out = finish(start(workdir))                 # resumes from the latest complete step
    assert steps(workdir)[-1] == TOTAL, out[-3000:]
    assert "Traceback" not in out, out[-3000:]
    params, ema = reference
    # One device, same program, same batches and RNG: XLA on CPU is deterministic.
    assert max_diff(restore_params(str(workdir), use_ema=False), params) == 0.0
    assert max_diff(restore_params(str(workdir)), ema) == 0.0


@pytest.mark.slow
def test_a_run_saved_on_4_devices_with_fsdp_resumes_on_2(reference, tmp_path):
    workdir = tmp_path / "reshard"
    fsdp = ["--config.fsdp_min_size=256"]
    out = finish(start(workdir, "--config.total_steps=4", "--config.mesh=(('data',1),('fsdp',4))",
                         *fsdp, devices=4))
    assert steps(workdir)[-1] == 4, out[-3000:]
    out = finish(start(workdir, "--config.mesh=(('data',-1),('fsdp',2))", *fsdp, devices=2))
    assert "Restoring checkpoint of step 4" in out and "mesh {'data': 1, 'fsdp': 2}" in out, \
        out[-3000:]
    assert steps(workdir)[-1] == TOTAL
    # Different meshes reduce in a different order: float32 rounding only.
    params = reference[0]
    scale = max(float(np.max(np.abs(p))) for p in jax.tree.leaves(params))
    assert max_diff(restore_params(str(workdir), use_ema=False), params) <= 1e-4 * scale


def test_checkpoints_keep_the_latest_n_plus_every_kth_step(tmp_path):
    import jax.numpy as jnp

    from fmboost_jax.checkpoints import store

    class Position:  # the smallest input-pipeline state
        def __init__(self, step):
            self.step = step

        def get_state(self):
            return {"step": self.step}

    mngr = store.checkpoint_manager(str(tmp_path), keep=2, keep_every=4)
    for step in range(1, 11):
        store.save(mngr, step, {"w": jnp.full((3,), float(step))}, Position(step))
    mngr.wait_until_finished()
    assert sorted(mngr.all_steps()) == [4, 8, 9, 10]
    abstract = {"w": jax.ShapeDtypeStruct((3,), jnp.float32,
                                          sharding=jax.sharding.SingleDeviceSharding(jax.devices()[0]))}
    state, data = store.restore(mngr, abstract, step=8)
    assert state["w"].tolist() == [8.0] * 3 and data == {"step": 8}
    mngr.close()
