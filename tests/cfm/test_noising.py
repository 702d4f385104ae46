"""Tests of fmboost_jax/noising.py: the reference's shifted-cosine forward process."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fmboost_jax.cfm import noising


def test_alpha_bar_at_step_400_is_0_65390():
    assert noising.alpha_bar_at(400) == pytest.approx(0.65390, abs=5e-6)
    a = noising.alpha_bar_at(400)
    assert np.sqrt(a) == pytest.approx(0.80864, abs=1e-5)
    assert np.sqrt(1 - a) == pytest.approx(0.58830, abs=1e-5)


def test_alpha_bar_decreases_from_one_to_zero():
    a = noising.shifted_cosine_alpha_bar(1000)
    assert a[0] == pytest.approx(1.0, abs=1e-6) and a[-1] < 1e-6
    assert np.all(np.diff(a) <= 0)


def test_q_sample_has_the_promised_mean_and_variance():
    x = jnp.full((200_000,), 2.0)
    y = noising.q_sample(x, 400, jax.random.normal(jax.random.PRNGKey(0), x.shape))
    assert float(y.mean()) == pytest.approx(2.0 * 0.80864, abs=5e-3)
    assert float(y.std()) == pytest.approx(0.58830, abs=5e-3)


def test_noising_step_outside_the_schedule_is_rejected():
    with pytest.raises(ValueError, match="noising_step"):
        noising.alpha_bar_at(1000)
