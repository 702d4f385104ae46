"""Command line: `python -m fmboost_jax.train --config=configs/X.py --workdir=DIR`.

Fields of the config can be overridden with `--config.a.b=value`; rerunning with the
same workdir resumes from its latest checkpoint. A multi-process run starts this command
once per process (see `fmboost_jax/parallel/distributed.py` and `launch/`). On SIGTERM the run saves
a checkpoint at the next step and exits with status 0.
"""

import asyncio
import logging as pylogging
import os

from absl import app, flags, logging
from ml_collections import config_flags

from fmboost_jax import compile_cache, paths
from fmboost_jax.cli import config_from_flag, run_app, user_errors_in_one_line
from fmboost_jax.errors import UserError
from fmboost_jax.parallel import distributed

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Config: a file (configs/lhq.py[:arg]) or a name of configs/ (lhq:smoke).",
    lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs and samples "
                               "(local or gs://).")
_DISTRIBUTED = flags.DEFINE_enum("distributed", "auto", distributed.MODES,
                                 "Join a multi-process run: auto (if SLURM or the flags/JAX_* "
                                 "variables say so), on (TPU pods), off.")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None,
                                   "host:port of process 0 (default: $JAX_COORDINATOR_ADDRESS).")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None,
                                      "Processes in the run (default: $JAX_NUM_PROCESSES).")
_PROCESS_ID = flags.DEFINE_integer("process_id", None,
                                   "This process's id (default: $JAX_PROCESS_ID).")
_NO_COMPILE_CACHE = flags.DEFINE_bool("no_compile_cache", False, compile_cache.FLAG_HELP)
_PREFLIGHT = flags.DEFINE_integer("preflight_devices", 0,
                                  "Check the run before starting it on a slice of this many "
                                  "devices (config, VAE, data, Inception weights, mesh and batch), "
                                  "from one host, then exit without training (0: train).")
flags.mark_flags_as_required(["config", "workdir"])


class _QuietLibraries(pylogging.Filter):
    """Drops the INFO chatter of orbax (one line per checkpoint file operation), the tracebacks
    of its background errors and asyncio's echoes of them: the run reports a failed save itself,
    in one line."""

    def filter(self, record: pylogging.LogRecord) -> bool:
        if "asyncio" in record.pathname and "never retrieved" in str(record.msg):
            return False        # the other writes of a failed save, collected after it
        if "orbax" not in record.pathname:
            return True
        record.exc_info, record.exc_text = None, None
        return record.levelno >= pylogging.WARNING


def _drop_calls_on_closed_loops() -> None:
    """After a failed asynchronous save, orbax closes its event loop while tensorstore still
    completes the other writes and schedules their callbacks on it; each such call raises
    'Event loop is closed' and prints a traceback (dozens, all alike). Such a call could never run,
    so it is dropped instead; the run reports the failed save itself, in one line."""
    original = asyncio.BaseEventLoop.call_soon_threadsafe

    def call_soon_threadsafe(loop, callback, *args, context=None):
        if loop.is_closed():
            return None
        return original(loop, callback, *args, context=context)

    asyncio.BaseEventLoop.call_soon_threadsafe = call_soon_threadsafe


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    logging.set_verbosity(logging.INFO)
    logging.get_absl_handler().addFilter(_QuietLibraries())
    _drop_calls_on_closed_loops()
    if _PREFLIGHT.value:
        with user_errors_in_one_line():
            preflight(config_from_flag(_CONFIG), _WORKDIR.value, _PREFLIGHT.value)
        return
    compile_cache.enable(off=_NO_COMPILE_CACHE.value)
    distributed.initialize(_DISTRIBUTED.value, _COORDINATOR.value, _NUM_PROCESSES.value,
                           _PROCESS_ID.value)
    from fmboost_jax.checkpoints.store import CheckpointError  # after the processes connect
    from fmboost_jax.train.loop import train_and_evaluate
    with user_errors_in_one_line(CheckpointError):
        train_and_evaluate(config_from_flag(_CONFIG), _WORKDIR.value)


def preflight(config, workdir: str, num_devices: int) -> None:
    """The checks a run makes before any work, for a slice of `num_devices` devices, from one
    host (no devices are joined); prints one line when they pass."""
    from fmboost_jax.parallel import sharding
    from fmboost_jax.train.setup import startup_checks, validate
    if num_devices < 1:
        raise app.UsageError(f"--preflight_devices must be >= 1, got {num_devices}")
    validate(config)
    startup_checks(config, num_devices)
    probe = paths.join(workdir, f".preflight-{os.getpid()}")
    try:                                     # the workdir takes a file (a bucket's permissions)
        paths.write_text(probe, "")
        paths.path(probe).unlink()
    except OSError as err:
        raise UserError(f"--workdir {workdir}: cannot write there ({err})") from None
    mesh = dict(zip((name for name, _ in config.mesh), sharding.mesh_shape(config.mesh, num_devices)))
    print(f"pre-flight: config, VAE, data and evaluation reachable; mesh {mesh} over "
          f"{num_devices} devices, batch {config.batch_size} ({config.batch_size // num_devices} "
          f"per device); workdir {workdir} writable: ok")


def run() -> None:
    """Console script `fmboost-train`."""
    run_app(main)


if __name__ == "__main__":
    run()
