"""Checkpoints that survive preemption: Orbax, asynchronous, atomic, sharding-aware.

A checkpoint of step `s` is the directory `workdir/checkpoints/s/` with two items:

- `state`: the `TrainState` (params, EMA params, optimizer state, step, RNG key), written
  asynchronously by every process for its shards;
- `data`: the input pipeline's position, one JSON file per process
  (`process_{i}-of-{n}.json`), so a resumed run reads exactly the batches it would have read;
- `checksums`: two 32-bit sums of every array of `state` (`checksums.py`), checked on restore.

Orbax writes a step into a temporary directory and renames it once every process has
finished, so a crash mid-write leaves the previous checkpoints as they were and the torn one
is ignored. Restoring takes the shardings of the *current* mesh, so a run may resume on a
different number of devices or hosts than it was saved from.

A checkpoint whose own files fail to decode or fail their checksums is never a dead end: `restore`
says so in one line, renames its directory to `unusable-STEP-TIME` (nothing is deleted) and takes
the next older one; only when none is usable does it stop (`CheckpointError`). A read that fails
for a transient reason (a bucket's 503, a reset connection) is retried with backoff, and if it
keeps failing the run stops with nothing moved. A state of another shape (the config changed the
network or the optimizer) is found from the metadata before any read (`state_differences`) and
is the caller's to refuse: it is not damage. A failed save (full
disk, no permission, a bucket error) stops the run with a `CheckpointError` naming the directory,
the cause and the intact steps.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import inspect
import json
import os
import sys
import time
from collections.abc import Iterator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from etils import epath
from orbax.checkpoint import checkpoint_managers as policies

from fmboost_jax import paths
from fmboost_jax.checkpoints import checksums

PyTree = Any
CONFIG_FILE = "config.json"    # a workdir's config, written once its state is restored or made
CHECKSUMS = "checksums"
READ_TRIES = 4                 # reads of one checkpoint before a transient fault is final
STILL_FAILING = "still failing after retries: "
FIRST_WAIT = 1.0               # seconds before the first retry; doubled each time
TRANSIENT = ("UNAVAILABLE", "DEADLINE_EXCEEDED", "RESOURCE_EXHAUSTED",   # gRPC/tensorstore codes
             "503 Service Unavailable", "429 Too Many Requests", "Connection reset",
             "timed out", "Temporary failure")    # whole phrases: a bare "503" is in byte counts


class CheckpointError(RuntimeError):
    """A checkpoint could not be written, or no checkpoint of a workdir can be read; the message
    names the directory, the steps and what to do."""


# ------------------------------------------------------------------------ data iterator state
class DataStateHandler(ocp.CheckpointHandler):
    """Saves `iterator.get_state()` (JSON-serialisable, or bytes of JSON) of every process.

    Unlike grain's own handler it takes any iterator with get/set_state (the demo's photos too)
    and restores None, instead of failing, when the process count has changed."""

    @staticmethod
    def _file(directory: epath.Path) -> epath.Path:
        return directory / f"process_{jax.process_index()}-of-{jax.process_count()}.json"

    def save(self, directory: epath.Path, args: DataStateSave) -> None:
        state = args.iterator.get_state()
        text = state.decode() if isinstance(state, bytes) else json.dumps(state)
        self._file(directory).write_text(text)

    def restore(self, directory: epath.Path, args: DataStateRestore = None) -> Any:
        """The state saved by this process, or None when it was saved by another topology."""
        path = self._file(directory)
        if not path.exists():
            logging.warning("No input-pipeline state for this process in %s (the checkpoint was "
                            "written by a different number of processes).", directory)
            return None
        return json.loads(path.read_text())

    def metadata(self, directory: epath.Path) -> None:
        return None

    def finalize(self, directory: epath.Path) -> None:
        pass

    def close(self) -> None:
        pass


@ocp.args.register_with_handler(DataStateHandler, for_save=True)
@dataclasses.dataclass
class DataStateSave(ocp.args.CheckpointArgs):
    iterator: Any


@ocp.args.register_with_handler(DataStateHandler, for_restore=True)
@dataclasses.dataclass
class DataStateRestore(ocp.args.CheckpointArgs):
    pass


# ------------------------------------------------------------------------ manager
def checkpoint_dir(workdir: str) -> str:
    return os.path.join(paths.resolve(workdir), "checkpoints")


def checkpoint_manager(workdir: str, keep: int, keep_every: int = 0) -> ocp.CheckpointManager:
    """Keeps the latest `keep` checkpoints plus every step divisible by `keep_every` (> 0)."""
    keep_policies = [policies.LatestN(n=keep)]
    if keep_every > 0:
        keep_policies.append(policies.EveryNSteps(interval_steps=keep_every))
    options = ocp.CheckpointManagerOptions(
        preservation_policy=policies.AnyPreservationPolicy(keep_policies),
        enable_async_checkpointing=True, create=True, cleanup_tmp_directories=True)
    return ocp.CheckpointManager(checkpoint_dir(workdir), options=options,
                                 item_handlers=_item_handlers())


def _item_handlers() -> dict[str, ocp.CheckpointHandler]:
    return {"state": ocp.StandardCheckpointHandler(), "data": DataStateHandler(),
            CHECKSUMS: ocp.JsonCheckpointHandler()}


def save(mngr: ocp.CheckpointManager, step: int, state: PyTree, data_iterator: Any) -> None:
    """Starts an asynchronous save of step `step` with the checksums of `state` (returns once
    the arrays are copied); CheckpointError if this or the previous save failed."""
    sums = checksums.compute(state)
    try:
        mngr.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                data=DataStateSave(data_iterator),
                                                **{CHECKSUMS: ocp.args.JsonSave(sums)}))
    except Exception as err:    # the previous asynchronous save's error surfaces here too
        raise CheckpointError(_save_failed(mngr, step, err)) from None


def check(mngr: ocp.CheckpointManager) -> None:
    """CheckpointError if an asynchronous save has failed (cheap: call it every step)."""
    try:
        mngr.check_for_errors()
    except Exception as err:
        raise CheckpointError(_save_failed(mngr, None, err)) from None


def wait(mngr: ocp.CheckpointManager, raise_error: bool = True) -> None:
    """Waits for an in-flight save; CheckpointError if it failed (logged instead, without
    `raise_error`, when another error is already on its way)."""
    try:
        mngr.wait_until_finished()
    except Exception as err:
        if raise_error:
            raise CheckpointError(_save_failed(mngr, None, err)) from None
        logging.error("%s", _save_failed(mngr, None, err))


def _save_failed(mngr: ocp.CheckpointManager, step: int | None, err: Exception) -> str:
    try:
        mngr.reload()
        intact = f"the checkpoints of steps {list(mngr.all_steps())} are intact"
    except Exception:   # the directory may be unreadable too
        intact = "the earlier checkpoints were not touched"
    when = f" (the run stopped at step {step})" if step is not None else ""
    return (f"saving a checkpoint in {mngr.directory} failed{when}: {_cause(err)}; "
            f"{intact}, and a torn save keeps its temporary name. Free space or fix access, "
            "then rerun the same command to resume.")


def _cause(err: BaseException) -> str:
    """The message of the error that `err` was raised from (`raise ... from`), on one line."""
    while err.__cause__ is not None:
        err = err.__cause__
    text = " ".join(str(err).split()) or type(err).__name__
    return text if len(text) <= 320 else f"{text[:150]} ... {text[-150:]}"   # the OS error is last


def abstract_with_shardings(abstract_state: PyTree, shardings: PyTree) -> PyTree:
    """ShapeDtypeStructs carrying the target shardings, for restoring onto the current mesh."""
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                        abstract_state, shardings)


def restore(mngr: ocp.CheckpointManager, abstract_state: PyTree, step: int | None = None
            ) -> tuple[PyTree, Any] | None:
    """(state, data state or None) of the latest usable (or the given) step, or None if there is
    no checkpoint. A checkpoint whose files do not decode or fail their checksums is moved aside
    and the next older one is tried (CheckpointError when none is usable); a transient read
    fault is retried and, if it persists, a CheckpointError with nothing moved.

    `abstract_state` is a pytree of ShapeDtypeStructs with shardings (`abstract_with_shardings`)
    of the same structure as the saved state (check `state_differences` first).
    """
    steps = sorted(mngr.all_steps(), reverse=True) if step is None else [step]
    unusable = []
    for s in steps:
        logging.info("Restoring checkpoint of step %d from %s", s, mngr.directory)
        items = {"state": ocp.args.StandardRestore(abstract_state), "data": DataStateRestore()}
        restored, error = _agreed(lambda s=s, items=items: _with_retries(
            lambda: _restore_verified(mngr, s, items), f"step {s}"))
        if error is None:
            return restored["state"], restored["data"]
        if error.startswith(STILL_FAILING):
            raise CheckpointError(f"reading the checkpoint of step {s} in {mngr.directory} failed "
                                  f"{READ_TRIES} times ({error}); nothing was moved: rerun the "
                                  "same command once the storage answers again.")
        moved = _move_aside(mngr, s)
        logging.error("The checkpoint of step %d is unusable (%s): moved to %s%s", s, error, moved,
                      "; trying the previous one" if s != steps[-1] else "")
        unusable.append(f"{s} ({error})")
    if unusable:
        raise CheckpointError(f"no usable checkpoint in {mngr.directory}: step "
                              f"{'; step '.join(unusable)}. They were moved aside, not deleted; "
                              "rerun to start from step 0, or move one back to resume from it.")
    return None


def _is_transient(error: BaseException | None) -> bool:
    """Whether a read failed for a reason outside the checkpoint's files (network, quota)."""
    while error is not None:
        if isinstance(error, (ConnectionError, TimeoutError)) or any(
                marker in str(error) for marker in TRANSIENT):
            return True
        error = error.__cause__ or error.__context__
    return False


def _with_retries(read, what: str):
    """`read()`, retried with backoff while it fails for a transient reason."""
    for attempt in range(READ_TRIES):
        try:
            return read()
        except Exception as err:
            if not _is_transient(err):
                raise
            if attempt == READ_TRIES - 1:     # the message says so: nothing is moved for it
                raise OSError(f"{STILL_FAILING}{_cause(err)}") from None
            wait = FIRST_WAIT * 2 ** attempt
            logging.warning("Reading %s failed (%s); retrying in %.0f s", what, _cause(err), wait)
            time.sleep(wait)


def leaf_shapes(tree: PyTree) -> dict[str, tuple[tuple[int, ...], str]]:
    """{"params/unet/conv/kernel": (shape, dtype), ...} of a state or of a checkpoint's metadata,
    with the same names for both (attribute, key and index steps all become path parts)."""
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {checksums.leaf_name(path): (tuple(leaf.shape), jnp.dtype(leaf.dtype).name)
            for path, leaf in leaves}


def state_differences(mngr: ocp.CheckpointManager, step: int, abstract_state: PyTree
                      ) -> list[str]:
    """How the state saved at `step` differs from `abstract_state` (the state a config builds):
    arrays of another shape or dtype, arrays only one of them has; [] when they match. Reads
    the checkpoint's metadata only."""
    saved = leaf_shapes(mngr.item_metadata(step)["state"])
    wanted = leaf_shapes(abstract_state)
    out = [f"{k} is {saved[k][0]} {saved[k][1]} in the checkpoint, {wanted[k][0]} {wanted[k][1]} now"
           for k in sorted(set(saved) & set(wanted)) if saved[k] != wanted[k]]
    for names, where in ((sorted(set(saved) - set(wanted)), "only the checkpoint has"),
                         (sorted(set(wanted) - set(saved)), "the checkpoint lacks")):
        if names:
            more = ", ..." if len(names) > 3 else ""
            out.append(f"{len(names)} arrays {where} ({', '.join(names[:3])}{more})")
    return out


def _restore_verified(mngr: ocp.CheckpointManager, step: int, items: dict[str, Any],
                      parts: tuple[str, ...] | None = None) -> dict[str, Any]:
    """Restores the `items` of `step` and checks its state (the `parts` of it that were read,
    or all) against the checksums saved with it; raises on any fault."""
    verified = (epath.Path(mngr.directory) / str(step) / CHECKSUMS).exists()
    if verified:
        items = {**items, CHECKSUMS: ocp.args.JsonRestore()}
    with _quiet_abandoned_reads():
        restored = mngr.restore(step, args=ocp.args.Composite(**items))
    _verify(restored, step, verified, parts)
    return restored


@contextlib.contextmanager
def _quiet_abandoned_reads() -> Iterator[None]:
    """When one read of a restore fails, orbax abandons the others; Python prints each one's
    error as it collects them ('Exception ignored in: <coroutine ...>', dozens, all repeating the
    error `restore` reports in one line). Those are dropped; any other unraisable error is not."""
    hook = sys.unraisablehook
    sys.unraisablehook = lambda u: None if inspect.iscoroutine(u.object) else hook(u)
    try:
        yield
    finally:
        gc.collect()
        sys.unraisablehook = hook


def _verify(restored: Any, step: int, verified: bool, parts: tuple[str, ...] | None) -> None:
    if not verified:
        logging.warning("The checkpoint of step %d has no checksums (an earlier version wrote "
                        "it): restored unverified.", step)
        return
    expected = restored[CHECKSUMS]
    if parts is not None:                       # a partial read: the sums of what was read
        expected = {k: v for k, v in expected.items() if k.split("/")[0] in parts}
    wrong = checksums.mismatches(expected, restored["state"])
    if wrong:
        more = f" and {len(wrong) - 3} more" if len(wrong) > 3 else ""
        raise ValueError(f"checksums differ for {', '.join(wrong[:3])}{more}: the files changed "
                         "after they were written")


def _agreed(fn) -> tuple[Any, str | None]:
    """(fn(), None), or (None, the cause) if it failed in this or any other process."""
    try:
        result, error = fn(), None
    except Exception as err:    # any fault makes the checkpoint unusable
        result, error = None, _cause(err)
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        failed = multihost_utils.process_allgather(np.int32(error is not None))
        if error is None and np.any(failed):
            result, error = None, "unreadable in another process"
    return result, error


def _move_aside(mngr: ocp.CheckpointManager, step: int) -> str:
    """Renames checkpoint `step` to `unusable-STEP-TIME` (process 0) and rescans the steps."""
    src = epath.Path(mngr.directory) / str(step)
    dst = src.parent / f"unusable-{step}-{time.strftime('%Y%m%dT%H%M%S')}"
    if jax.process_index() == 0 and src.exists():
        src.rename(dst)
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        multihost_utils.sync_global_devices(f"moved checkpoint {step} aside")
    mngr.reload()
    return str(dst)


def restore_params(workdir: str, use_ema: bool = True, step: int | None = None,
                   with_step: bool = False) -> PyTree:
    """UNet params (the EMA copy by default) of the latest (or given) checkpoint in `workdir`
    that reads and passes its checksums, as host-local arrays, e.g. for sampling in a notebook;
    `(params, step)` with `with_step`. Older checkpoints are tried in turn with a warning; a
    reader moves nothing."""
    key = "ema_params" if use_ema else "params"
    weights, s = read_weights(workdir, step, (key,))
    return (weights[key], s) if with_step else weights[key]


def read_weights(workdir: str, step: int | None = None,
                 parts: tuple[str, ...] = ("params", "ema_params")
                 ) -> tuple[dict[str, PyTree], int]:
    """({part: tree}, step) of the `parts` of the state ("params", "ema_params") of the latest
    (or given) usable checkpoint in `workdir`, host-local: only those arrays are read (not the
    optimizer's moments) and checked against their checksums. FileNotFoundError when it has no
    checkpoint, CheckpointError when none reads."""
    path = checkpoint_dir(workdir)
    mngr = ocp.CheckpointManager(path, item_handlers={**_item_handlers(),
                                                      "state": ocp.PyTreeCheckpointHandler()})
    steps = sorted(mngr.all_steps(), reverse=True) if step is None else [step]
    if not steps:
        raise FileNotFoundError(f"No checkpoint in {path}")
    errors = []
    try:
        for s in steps:
            try:
                state = _with_retries(lambda s=s: _read_parts(mngr, s, parts),
                                      f"step {s} of {path}")
                return state, s
            except Exception as err:    # any fault: try the next older one
                errors.append(f"step {s} ({_cause(err)})")
                logging.warning("The checkpoint of step %d in %s is unusable: %s", s, path,
                                errors[-1])
    finally:
        mngr.close()
    raise CheckpointError(f"no usable checkpoint in {path}: {'; '.join(errors)}")


def _read_parts(mngr: ocp.CheckpointManager, step: int, parts: tuple[str, ...]
                ) -> dict[str, PyTree]:
    """{part: tree} of the state of `step`, host-local whatever mesh wrote it, verified; only
    the arrays of `parts` are read."""
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    metadata = mngr.item_metadata(step)["state"]
    target = {p: jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device),
                              metadata[p]) for p in parts}
    restore = ocp.args.PyTreeRestore(item=target, partial_restore=True,
                                     restore_args=ocp.checkpoint_utils.construct_restore_args(target))
    return _restore_verified(mngr, step, {"state": restore}, parts)["state"]
