"""Tests of fmboost_jax/train/store.py off the happy path: every kind of damage to the
latest checkpoint (a flipped byte, a truncated, deleted or garbled file) moves it aside and the
previous one is restored, and a run resumes past it bitwise equal to an uninterrupted one; with
none usable the run stops saying so; a failing save (a file-size limit standing in for a full
disk) stops the run in one line and loses nothing."""

import glob
import json
import os
import pathlib
import shlex
import shutil
import subprocess
import sys

import pytest
from support import made_once
from training_runs import BASE_FLAGS, TOTAL, env, max_diff, steps

from fmboost_jax.checkpoints import store
from fmboost_jax.checkpoints.store import CheckpointError, restore_params


def tiny_run_config(total: int):
    """tests/tiny_config.py:flat with the overrides of `training_runs.BASE_FLAGS`."""
    import tiny_config
    c = tiny_config.get_config("flat")
    c.update(total_steps=total, checkpoint_every=1, log_every=1, eval_every=TOTAL,
             keep_checkpoints=2)
    c.optim.eps = 1e-4
    return c


def train(workdir, total: int = TOTAL):
    from fmboost_jax.train.loop import train_and_evaluate
    return train_and_evaluate(tiny_run_config(total), str(workdir))


LAST, PREVIOUS = TOTAL - 1, TOTAL - 2


@pytest.fixture(scope="session")
def stopped_run(tmp_path_factory):
    """A run stopped one step before the end: checkpoints PREVIOUS and LAST (made once for all
    workers; the tests change copies of it)."""
    def make(path):
        train(os.path.join(path, "run"), LAST)
        assert steps(os.path.join(path, "run")) == [PREVIOUS, LAST]
    return pathlib.Path(made_once(tmp_path_factory, "stopped", make)) / "run"


def data_files(step_dir) -> list[str]:
    """The files of the `state` item, largest last."""
    files = [f for f in glob.glob(os.path.join(step_dir, "state", "**"), recursive=True)
             if os.path.isfile(f)]
    return sorted(files, key=os.path.getsize)


def flip_a_byte(step_dir):
    path = data_files(step_dir)[-1]
    data = bytearray(open(path, "rb").read())
    data[len(data) // 2] ^= 0x04
    open(path, "wb").write(data)


def truncate(step_dir):
    path = data_files(step_dir)[-1]
    os.truncate(path, os.path.getsize(path) // 2)


def delete_the_largest(step_dir):
    os.remove(data_files(step_dir)[-1])


def garble_the_metadata(step_dir):
    meta = [f for f in data_files(step_dir) if os.path.basename(f) == "_METADATA"]
    open(meta[0], "w").write("{ not json")


def garble_the_data_state(step_dir):
    for path in glob.glob(os.path.join(step_dir, "data", "*.json")):
        open(path, "w").write("\x00\x01")


def restore_latest(workdir, step: int = PREVIOUS):
    """`store.restore` of the latest usable step, as `build_run` calls it (one device;
    the target tree is read from the metadata of `step`)."""
    import jax
    mngr = store.checkpoint_manager(str(workdir), keep=2)
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    metadata = mngr.item_metadata(step)["state"]
    abstract = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device),
                            metadata)
    try:
        return store.restore(mngr, abstract)
    finally:
        mngr.close()


@pytest.mark.parametrize("damage", [flip_a_byte, truncate, delete_the_largest,
                                    garble_the_metadata, garble_the_data_state])
def test_each_kind_of_damage_moves_the_checkpoint_aside_and_restores_the_previous_one(
        stopped_run, tmp_path, caplog, damage):
    workdir = tmp_path / "run"
    shutil.copytree(stopped_run, workdir)
    damage(os.path.join(workdir, "checkpoints", str(LAST)))
    state, data = restore_latest(workdir)
    assert int(state["step"]) == PREVIOUS and data is not None
    assert max_diff(state["ema_params"], restore_params(str(stopped_run), step=PREVIOUS)) == 0.0
    moved = [d for d in os.listdir(workdir / "checkpoints") if d.startswith(f"unusable-{LAST}-")]
    assert len(moved) == 1 and steps(workdir) == [PREVIOUS]      # renamed, not deleted
    assert f"The checkpoint of step {LAST} is unusable" in caplog.text


def damage_the_ema(step_dir):
    """The EMA params of a checkpoint made unusable, as a reader sees them: their saved
    checksums no longer match (a reader reads the EMA params alone, so damage elsewhere in the
    files may not concern it)."""
    path = os.path.join(step_dir, "checksums", "metadata")
    sums = json.load(open(path))
    json.dump({k: [0, 0] if k.startswith("ema_params/") else v for k, v in sums.items()},
              open(path, "w"))


def test_with_no_usable_checkpoint_the_run_stops_saying_so_and_a_reader_falls_back(stopped_run,
                                                                                  tmp_path):
    workdir = tmp_path / "run"
    shutil.copytree(stopped_run, workdir)
    damage_the_ema(os.path.join(workdir, "checkpoints", str(LAST)))
    # A reader (the notebook's path) takes the previous checkpoint and moves nothing.
    previous = restore_params(str(stopped_run), step=PREVIOUS)
    assert max_diff(restore_params(str(workdir)), previous) == 0.0
    assert restore_params(str(workdir), with_step=True)[1] == PREVIOUS   # the step it read
    assert steps(workdir) == [PREVIOUS, LAST]
    damage_the_ema(os.path.join(workdir, "checkpoints", str(PREVIOUS)))
    with pytest.raises(CheckpointError, match="no usable checkpoint") as err:
        restore_params(str(workdir))
    assert f"step {LAST} (" in str(err.value) and f"step {PREVIOUS} (" in str(err.value)
    with pytest.raises(CheckpointError,         # what the run's start-up (`build_run`) raises
                       match=f"no usable checkpoint.*step {LAST}.*step {PREVIOUS}.*moved aside"):
        restore_latest(workdir, step=LAST)
    assert steps(workdir) == []


@pytest.mark.slow
def test_the_command_resumes_past_a_torn_checkpoint_bitwise_equal_with_one_line_no_traceback(
        reference, stopped_run, tmp_path):
    from support import ROOT
    workdir = tmp_path / "run"
    shutil.copytree(stopped_run, workdir)
    truncate(os.path.join(workdir, "checkpoints", str(LAST)))
    cmd = [sys.executable, "-m", "fmboost_jax.train", *BASE_FLAGS, f"--workdir={workdir}"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env(1), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert sum(f"checkpoint of step {LAST} is unusable" in line
               for line in proc.stderr.splitlines()) == 1
    assert "Traceback" not in proc.stderr and "Exception ignored" not in proc.stderr
    assert steps(workdir)[-1] == TOTAL
    assert max_diff(restore_params(str(workdir)), reference[1]) == 0.0


def test_checksums_catch_every_single_bit_flip_of_every_dtype():
    import jax.numpy as jnp
    import numpy as np

    from fmboost_jax.checkpoints import checksums
    tree = {"f32": jnp.linspace(-1, 1, 7), "bf16": jnp.linspace(-1, 1, 5).astype(jnp.bfloat16),
            "i32": jnp.arange(3), "u32": jnp.arange(4, dtype=jnp.uint32),
            "flag": jnp.array([True, False])}
    sums = checksums.compute(tree)
    assert checksums.mismatches(sums, tree) == []
    # The definition, in numpy: sums of the 32-bit words, plain and weighted by 2i + 1 (mod 2^32).
    x = jnp.linspace(-3, 3, 24).reshape(2, 3, 4)
    words = np.asarray(x).view(np.uint32).ravel().astype(np.uint64)
    odd = np.arange(words.size, dtype=np.uint64) * 2 + 1
    assert checksums.compute({"x": x})["x"] == [int(words.sum() % 2 ** 32),
                                               int((words * odd).sum() % 2 ** 32)]
    for name, leaf in tree.items():
        raw = np.asarray(leaf).copy()
        bits = raw.view(np.uint8)
        for byte in range(bits.size):
            for bit in range(8):
                if leaf.dtype == jnp.bool_ and bit > 0:
                    continue                            # a bool holds one bit
                bits[byte] ^= 1 << bit
                assert checksums.mismatches(sums, {**tree, name: jnp.asarray(raw)}) == [name]
                bits[byte] ^= 1 << bit
    swapped = {**tree, "f32": tree["f32"][::-1]}        # same values, other positions
    assert checksums.mismatches(sums, swapped) == ["f32"]


FILE_LIMIT_KB = 64      # above the logs of a short run, below a checkpoint's data file


@pytest.mark.slow
def test_a_failing_save_stops_the_run_in_one_line_and_loses_nothing(stopped_run, tmp_path):
    from support import ROOT
    workdir = tmp_path / "run"
    shutil.copytree(stopped_run, workdir)
    environment = env(1)
    # Writes past the size limit fail with EFBIG ("File too large"), as they would with ENOSPC
    # on a full disk; the ignored SIGXFSZ makes them fail instead of killing the process.
    cmd = shlex.join([sys.executable, "-m", "fmboost_jax.train", *BASE_FLAGS,
                      f"--workdir={workdir}"])
    proc = subprocess.run(["bash", "-c", f"ulimit -f {FILE_LIMIT_KB}; trap '' XFSZ; exec {cmd}"],
                          cwd=ROOT, env=environment, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, proc.stderr[-3000:]
    assert f"saving a checkpoint in {workdir / 'checkpoints'} failed" in errors[0]
    assert "File too large" in errors[0] and f"[{PREVIOUS}, {LAST}] are intact" in errors[0]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert steps(workdir) == [PREVIOUS, LAST]           # nothing half-written looks complete
    assert max_diff(restore_params(str(workdir)), restore_params(str(stopped_run))) == 0.0
