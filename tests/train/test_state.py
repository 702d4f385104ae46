"""Tests of fmboost_jax/train/state.py: learning-rate schedule and the EMA rule."""

import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from fmboost_jax.config import base_config
from fmboost_jax.train.state import ema_decay, learning_rate_schedule, update_ema


def test_learning_rate_warms_up_as_the_references_lambda_lr_then_stays_constant():
    optim = base_config().optim                      # lr 3e-5, 1000 warm-up steps
    sched = learning_rate_schedule(optim)            # update n: lr * min(1, (n + 1) / 1000)
    for n in (0, 1, 499, 998, 999, 1000, 50_000):
        assert float(sched(n)) == pytest.approx(3e-5 * min(1.0, (n + 1) / 1000), rel=1e-4)
    optim.warmup_from_zero = True                    # the option: update n gets lr * n / 1000
    sched = learning_rate_schedule(optim)
    assert float(sched(0)) == 0.0
    assert float(sched(500)) == pytest.approx(1.5e-5)
    assert float(sched(1000)) == pytest.approx(3e-5)


def test_ema_decay_follows_the_reference_warm_up_rule():
    ema = base_config().ema  # rate .999, after 1000, power 3/4
    assert float(ema_decay(jnp.array(0), ema)) == 0.0
    assert float(ema_decay(jnp.array(1000), ema)) == 0.0
    assert float(ema_decay(jnp.array(1001), ema)) == pytest.approx(1 - 2 ** -0.75, rel=1e-6)
    assert float(ema_decay(jnp.array(1010), ema)) == pytest.approx(1 - 11 ** -0.75, rel=1e-6)
    assert float(ema_decay(jnp.array(10 ** 7), ema)) == pytest.approx(0.999)


def test_ema_copies_before_the_warm_up_ends_and_averages_after():
    ema = ml_collections.ConfigDict(dict(rate=0.5, update_every=1, update_after_step=2, power=1.0))
    p_old, p_new = {"w": jnp.array(0.0)}, {"w": jnp.array(4.0)}
    assert float(update_ema(p_old, p_new, jnp.array(2), ema)["w"]) == 4.0
    # step 3: e = 1, decay = min(.5, 1 - 1/2) = .5
    assert float(update_ema(p_old, p_new, jnp.array(3), ema)["w"]) == pytest.approx(2.0)


def test_ema_holds_between_updates_when_update_every_is_larger_than_one():
    ema = ml_collections.ConfigDict(dict(rate=0.5, update_every=2, update_after_step=0, power=1.0))
    p_old, p_new = {"w": jnp.array(0.0)}, {"w": jnp.array(4.0)}
    np.testing.assert_allclose(update_ema(p_old, p_new, jnp.array(3), ema)["w"], 0.0)
    np.testing.assert_allclose(update_ema(p_old, p_new, jnp.array(4), ema)["w"], 2.0)
