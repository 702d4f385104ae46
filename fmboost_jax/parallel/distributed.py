"""Joining a multi-process (multi-host) run.

Every process of a run calls `initialize` before touching a device. It connects the processes
with `jax.distributed.initialize` when the run spans several of them:

- Cloud TPU pod slices: pass `distributed="on"`; JAX finds the workers by itself.
- SLURM: detected from its environment (`SLURM_JOB_ID`, `SLURM_NTASKS > 1`); JAX reads the
  node list, process count and id.
- Anything else (plain GPU clusters, several processes on one machine): the coordinator
  address (`host:port` of process 0), the number of processes and this process's id, from
  arguments or the variables `JAX_COORDINATOR_ADDRESS`, `JAX_NUM_PROCESSES`, `JAX_PROCESS_ID`.

A single process needs none of this.
"""

from __future__ import annotations

import os

import jax
from absl import logging

from fmboost_jax.errors import UserError

MODES = ("auto", "on", "off")


def _env_int(name: str) -> int | None:
    value = os.environ.get(name)
    if value in (None, ""):
        return None
    try:
        return int(value)
    except ValueError:
        raise UserError(f"Environment variable {name}={value!r} is not an integer") from None


def initialize(mode: str = "auto", coordinator_address: str | None = None,
               num_processes: int | None = None, process_id: int | None = None) -> bool:
    """Connects this process to the others of its run; True if it did.

    `mode`: "auto" connects when the arguments, the JAX_* variables or SLURM describe more
    than one process; "on" always calls `jax.distributed.initialize` (TPU pods); "off" never.
    """
    if mode not in MODES:
        raise UserError(f"--distributed must be one of {MODES}, got {mode!r}")
    if mode == "off":
        return False
    coordinator_address = coordinator_address or os.environ.get("JAX_COORDINATOR_ADDRESS") or None
    num_processes = num_processes if num_processes is not None else _env_int("JAX_NUM_PROCESSES")
    process_id = process_id if process_id is not None else _env_int("JAX_PROCESS_ID")
    explicit = (coordinator_address, num_processes, process_id)
    slurm = "SLURM_JOB_ID" in os.environ and (_env_int("SLURM_NTASKS") or 1) > 1
    if mode == "auto" and not slurm and (num_processes or 1) <= 1:
        return False
    if mode == "auto" and not slurm and None in explicit:
        raise UserError("A multi-process run needs the coordinator address, the number of "
                         "processes and this process's id (flags --coordinator_address, "
                         "--num_processes, --process_id or the JAX_* variables); got "
                         f"{explicit}")
    logging.info("Joining the distributed run (coordinator %s, %s processes, id %s)",
                 coordinator_address or "auto", num_processes or "auto",
                 process_id if process_id is not None else "auto")
    jax.distributed.initialize(coordinator_address=coordinator_address,
                               num_processes=num_processes, process_id=process_id)
    logging.info("Process %d of %d: %d local devices, %d in all", jax.process_index(),
                 jax.process_count(), jax.local_device_count(), jax.device_count())
    return True
