"""Stopping cleanly when the scheduler says so.

TPU maintenance events, spot/preemptible VMs and cluster schedulers (SLURM's `scancel`,
Kubernetes) stop a job with SIGTERM and kill it a while later. `PreemptionWatcher.reached(step)`
turns that notice into a step at which *every* process saves a checkpoint and exits:

- one process: a SIGTERM handler records the notice; the next step boundary is the point;
- several processes: JAX's preemption service (started by `jax.distributed.initialize`)
  catches the signal on any host, and all hosts agree on the same step to stop at.
"""

from __future__ import annotations

import signal
import threading

import jax
from jax.experimental import multihost_utils


class PreemptionWatcher:
    def __init__(self):
        self._notice = threading.Event()
        self._previous = None
        self._multiprocess = jax.process_count() > 1
        if not self._multiprocess and threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._on_sigterm)

    def _on_sigterm(self, signum, frame) -> None:
        del signum, frame
        self._notice.set()

    def reached(self, step: int) -> bool:
        """True (on every process alike) when the run should save at `step` and stop.
        Call it at every step boundary."""
        if self._multiprocess:
            return multihost_utils.reached_preemption_sync_point(step)
        return self._notice.is_set()

    def close(self) -> None:
        """Puts back the SIGTERM handler that was there before."""
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
            self._previous = None
