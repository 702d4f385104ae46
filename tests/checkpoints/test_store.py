"""Tests of fmboost_jax/checkpoints/store.py: a run stopped by SIGTERM and killed at six random
moments resumes bitwise equal, a run saved on 4 devices with FSDP resumes on 2, and the
retention policy."""

import os
import random
import signal
import time

import jax
import numpy as np
import pytest
from training_runs import (
    EVERY_STEP,
    FINAL_ONLY,
    TOTAL,
    finish,
    max_diff,
    start,
    steps,
    wait_for_checkpoint,
)

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
def test_a_run_stopped_by_sigterm_and_killed_at_six_random_moments_ends_bitwise_equal(
        reference, tmp_path):
    """First a SIGTERM (fmboost_jax/train/preemption.py, one process): the run saves at the next
    step boundary and exits 0 before its end. Then SIGKILL (no clean-up) at seeded random
    moments: three attempts during start-up (imports, compilation, restoring), three during
    training, where a checkpoint is saved asynchronously every step, so those kills land
    mid-save."""
    rng = random.Random(0)
    workdir = tmp_path / "soak"
    proc = start(workdir)
    wait_for_checkpoint(proc, workdir, 2)
    proc.send_signal(signal.SIGTERM)
    out = finish(proc)
    assert proc.returncode == 0 and "Preemption notice: saved step" in out, out[-3000:]
    progress = [steps(workdir)[-1]]          # the latest complete step after each attempt
    assert progress[0] < TOTAL, "the run finished before the signal arrived"
    assert not os.path.exists(workdir / "eval.json")       # stopped early: no final evaluation
    for attempt in range(KILLS):
        done = progress[-1]
        proc = start(workdir, EVERY_STEP)
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
    assert len(progress) == KILLS + 1, progress                    # all kills before the end
    out = finish(start(workdir, EVERY_STEP))      # resumes from the latest complete step
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
    out = finish(start(workdir, "--config.mesh=(('data',-1),('fsdp',2))", *fsdp, FINAL_ONLY,
                       devices=2))
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


def _one_checkpoint(tmp_path):
    import jax.numpy as jnp
    import orbax.checkpoint as ocp

    from fmboost_jax.checkpoints import store

    class Position:
        def get_state(self):
            return {"step": 1}

    mngr = store.checkpoint_manager(str(tmp_path), keep=2)
    store.save(mngr, 1, {"w": jnp.arange(3.0)}, Position())
    mngr.wait_until_finished()
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    abstract = {"w": jax.ShapeDtypeStruct((3,), jnp.float32, sharding=device)}
    return store, mngr, abstract, ocp


def test_a_transient_read_error_is_retried_and_a_lasting_one_moves_nothing(tmp_path, monkeypatch):
    store, mngr, abstract, ocp = _one_checkpoint(tmp_path)
    monkeypatch.setattr(store.time, "sleep", lambda s: None)
    real, calls = ocp.CheckpointManager.restore, []

    def flaky(self, *args, **kwargs):            # a bucket that answers on the third try
        calls.append(1)
        if len(calls) < 3:
            raise ConnectionError("503 Service Unavailable")
        return real(self, *args, **kwargs)

    monkeypatch.setattr(ocp.CheckpointManager, "restore", flaky)
    state, data = store.restore(mngr, abstract)
    assert state["w"].tolist() == [0.0, 1.0, 2.0] and data == {"step": 1} and len(calls) == 3

    def down(self, *args, **kwargs):                  # no status in the message: its type says
        raise ConnectionRefusedError("the storage refused the connection")
    monkeypatch.setattr(ocp.CheckpointManager, "restore", down)
    listing = sorted(os.listdir(tmp_path / "checkpoints"))
    with pytest.raises(store.CheckpointError, match="failed 4 times .*nothing was moved"):
        store.restore(mngr, abstract)
    assert sorted(os.listdir(tmp_path / "checkpoints")) == listing == ["1"]
    mngr.close()
    # Damage is not a transient fault, whatever numbers its message holds.
    assert not store._is_transient(ValueError(
        "OUT_OF_RANGE: Requested byte range [826201, 856231) is not valid for value of size 503208"))


def test_the_state_shapes_are_compared_from_the_metadata_alone(tmp_path):
    import jax.numpy as jnp
    store, mngr, abstract, _ = _one_checkpoint(tmp_path)
    assert store.state_differences(mngr, 1, abstract) == []
    other = {"w": jax.ShapeDtypeStruct((4,), jnp.float32), "b": jax.ShapeDtypeStruct((), jnp.int32)}
    assert store.state_differences(mngr, 1, other) == [
        "w is (3,) float32 in the checkpoint, (4,) float32 now", "1 arrays the checkpoint lacks (b)"]
    mngr.close()


def test_reading_the_ema_params_reads_and_verifies_only_them(tmp_path, monkeypatch):
    """`restore_params` (inference) asks Orbax for the EMA params alone, not the optimizer's
    moments: a wrong checksum of an Adam moment does not stop it, one of an EMA array does."""
    import json

    import jax.numpy as jnp
    import orbax.checkpoint as ocp

    from fmboost_jax.checkpoints import store

    class Position:
        def get_state(self):
            return {"step": 1}

    state = {"params": {"w": jnp.arange(3.0)}, "ema_params": {"w": jnp.arange(3.0) + 1},
             "opt_state": {"mu": {"w": jnp.ones(3)}, "nu": {"w": jnp.ones(3)}}}
    mngr = store.checkpoint_manager(str(tmp_path), keep=2)
    store.save(mngr, 1, state, Position())
    mngr.wait_until_finished()
    mngr.close()
    asked = []
    real = ocp.args.PyTreeRestore

    def spy(*args, **kwargs):
        asked.append(sorted(kwargs["item"]))
        return real(*args, **kwargs)
    monkeypatch.setattr(ocp.args, "PyTreeRestore", spy)
    sums_file = tmp_path / "checkpoints" / "1" / "checksums" / "metadata"   # Orbax's JSON item
    sums = json.load(open(sums_file))
    sums["opt_state/mu/w"] = [0, 0]                          # as if the moment were damaged
    json.dump(sums, open(sums_file, "w"))
    ema = store.restore_params(str(tmp_path))
    assert ema["w"].tolist() == [1.0, 2.0, 3.0] and asked == [["ema_params"]]
    sums["ema_params/w"] = [0, 0]
    json.dump(sums, open(sums_file, "w"))
    with pytest.raises(store.CheckpointError, match="checksums differ for ema_params/w"):
        store.restore_params(str(tmp_path))
