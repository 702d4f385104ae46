"""Tests of fmboost_jax/parallel/distributed.py: when a process joins a multi-process run."""

import pytest

from fmboost_jax.parallel import distributed


def test_a_single_process_joins_nothing(monkeypatch):
    for var in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID", "SLURM_JOB_ID"):
        monkeypatch.delenv(var, raising=False)
    assert distributed.initialize("auto") is False
    assert distributed.initialize("off", "localhost:1", 2, 0) is False


def test_an_incomplete_multi_process_description_is_refused_naming_what_is_missing(monkeypatch):
    monkeypatch.delenv("JAX_COORDINATOR_ADDRESS", raising=False)
    monkeypatch.setenv("JAX_NUM_PROCESSES", "2")
    monkeypatch.delenv("JAX_PROCESS_ID", raising=False)
    with pytest.raises(ValueError, match="coordinator address.*process's id"):
        distributed.initialize("auto")
    monkeypatch.setenv("JAX_PROCESS_ID", "one")
    with pytest.raises(ValueError, match="JAX_PROCESS_ID='one' is not an integer"):
        distributed.initialize("auto")
    with pytest.raises(ValueError, match="--distributed must be one of"):
        distributed.initialize("sometimes")


@pytest.fixture
def calls(monkeypatch):
    """What `jax.distributed.initialize` is called with (the call is recorded, not made)."""
    import jax
    recorded = []
    monkeypatch.setattr(jax.distributed, "initialize", lambda **kw: recorded.append(kw))
    for var in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID", "SLURM_JOB_ID",
                "SLURM_NTASKS"):
        monkeypatch.delenv(var, raising=False)
    return recorded


def test_slurm_with_several_tasks_lets_jax_read_the_cluster(monkeypatch, calls):
    monkeypatch.setenv("SLURM_JOB_ID", "42")
    monkeypatch.setenv("SLURM_NTASKS", "1")              # one task: nothing to join
    assert distributed.initialize("auto") is False and calls == []
    monkeypatch.setenv("SLURM_NTASKS", "4")
    assert distributed.initialize("auto") is True
    assert calls == [dict(coordinator_address=None, num_processes=None, process_id=None)]


def test_on_always_joins_and_explicit_values_win_over_the_environment(monkeypatch, calls):
    assert distributed.initialize("on") is True                   # a TPU pod: JAX finds all
    assert calls[-1] == dict(coordinator_address=None, num_processes=None, process_id=None)
    monkeypatch.setenv("JAX_COORDINATOR_ADDRESS", "10.0.0.1:1234")
    monkeypatch.setenv("JAX_NUM_PROCESSES", "4")
    monkeypatch.setenv("JAX_PROCESS_ID", "3")
    assert distributed.initialize("auto") is True
    assert calls[-1] == dict(coordinator_address="10.0.0.1:1234", num_processes=4, process_id=3)
    assert distributed.initialize("auto", "host:9", 2, 1) is True
    assert calls[-1] == dict(coordinator_address="host:9", num_processes=2, process_id=1)
