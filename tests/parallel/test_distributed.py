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
