"""Checkpoints that survive preemption: Orbax, asynchronous, atomic, sharding-aware.

A checkpoint of step `s` is the directory `workdir/checkpoints/s/` with two items:

- `state`: the `TrainState` (params, EMA params, optimizer state, step, RNG key), written
  asynchronously by every process for its shards;
- `data`: the input pipeline's position, one JSON file per process
  (`process_{i}-of-{n}.json`), so a resumed run reads exactly the batches it would have read.

Orbax writes a step into a temporary directory and renames it once every process has
finished, so a crash mid-write leaves the previous checkpoints as they were and the torn one
is ignored. Restoring takes the shardings of the *current* mesh, so a run may resume on a
different number of devices or hosts than it was saved from.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import jax
import orbax.checkpoint as ocp
from absl import logging
from etils import epath
from orbax.checkpoint import checkpoint_managers as policies

from fmboost_jax import paths

PyTree = Any


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
                                 item_handlers={"state": ocp.StandardCheckpointHandler(),
                                                "data": DataStateHandler()})


def save(mngr: ocp.CheckpointManager, step: int, state: PyTree, data_iterator: Any) -> None:
    """Starts an asynchronous save of step `step` (returns once the arrays are copied)."""
    mngr.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                            data=DataStateSave(data_iterator)))


def abstract_with_shardings(abstract_state: PyTree, shardings: PyTree) -> PyTree:
    """ShapeDtypeStructs carrying the target shardings, for restoring onto the current mesh."""
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                        abstract_state, shardings)


def restore(mngr: ocp.CheckpointManager, abstract_state: PyTree, step: int | None = None
            ) -> tuple[PyTree, Any] | None:
    """(state, data state or None) of the latest (or given) step, or None if there is none.

    `abstract_state` is a pytree of ShapeDtypeStructs with shardings (`abstract_with_shardings`).
    """
    step = mngr.latest_step() if step is None else step
    if step is None:
        return None
    logging.info("Restoring checkpoint of step %d from %s", step, mngr.directory)
    restored = mngr.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state), data=DataStateRestore()))
    return restored["state"], restored["data"]


def restore_params(workdir: str, use_ema: bool = True, step: int | None = None) -> PyTree:
    """UNet params (the EMA copy by default) of the latest (or given) checkpoint in `workdir`,
    as host-local arrays, e.g. for sampling in a notebook."""
    path = checkpoint_dir(workdir)
    mngr = ocp.CheckpointManager(path, item_handlers={"state": ocp.StandardCheckpointHandler(),
                                                      "data": DataStateHandler()})
    step = mngr.latest_step() if step is None else step
    if step is None:
        raise FileNotFoundError(f"No checkpoint in {path}")
    # Read every array whole onto one local device, whatever mesh wrote it.
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    metadata = mngr.item_metadata(step)["state"]
    target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device),
                          metadata)
    restored = mngr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target)))
    mngr.close()
    return restored["state"]["ema_params" if use_ema else "params"]
