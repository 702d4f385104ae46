"""An uninterrupted single-device run that the checkpoint and preemption tests compare with."""

import pytest
from training_runs import TOTAL, finish, start, steps

from fmboost_jax.train.checkpointing import restore_params


@pytest.fixture(scope="session")
def reference(tmp_path_factory):
    """Final params and EMA params of an uninterrupted single-device run."""
    workdir = tmp_path_factory.mktemp("reference")
    out = finish(start(workdir))
    assert steps(workdir)[-1] == TOTAL, out[-3000:]
    return restore_params(str(workdir), use_ema=False), restore_params(str(workdir))
