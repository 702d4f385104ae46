"""Tests of fmboost_jax/flow.py: path invariants and the loss."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fmboost_jax.cfm import flow
from fmboost_jax.config import base_config
from fmboost_jax.errors import ConfigError


@pytest.fixture
def pair():
    k0, k1 = jax.random.split(jax.random.PRNGKey(0))
    return jax.random.normal(k0, (3, 4, 4, 2)), jax.random.normal(k1, (3, 4, 4, 2))


@pytest.mark.parametrize("schedule", flow.PATHS)
def test_path_starts_at_x0_and_ends_at_x1(schedule, pair):
    x0, x1 = pair
    path = flow.PATHS[schedule]
    np.testing.assert_allclose(flow.compute_xt(path, x0, x1, jnp.zeros(3)), x0, atol=1e-6)
    np.testing.assert_allclose(flow.compute_xt(path, x0, x1, jnp.ones(3)), x1, atol=1e-6)


@pytest.mark.parametrize("schedule", flow.PATHS)
def test_target_velocity_is_the_time_derivative_of_the_path(schedule, pair):
    x0, x1 = pair
    path = flow.PATHS[schedule]
    t = jnp.array([0.1, 0.5, 0.9])
    _, dxt = jax.jvp(lambda s: flow.compute_xt(path, x0, x1, s), (t,), (jnp.ones(3),))
    np.testing.assert_allclose(flow.compute_ut(path, x0, x1, t), dxt, atol=1e-5)


def test_linear_path_velocity_is_x1_minus_x0(pair):
    x0, x1 = pair
    u = flow.compute_ut(flow.LINEAR, x0, x1, jnp.array([0.2, 0.4, 0.7]))
    np.testing.assert_allclose(u, x1 - x0, atol=1e-6)


def test_sigma_min_adds_scaled_noise(pair):
    x0, x1 = pair
    eps = jnp.ones_like(x0)
    t = jnp.full((3,), 0.3)
    a = flow.compute_xt(flow.LINEAR, x0, x1, t)
    b = flow.compute_xt(flow.LINEAR, x0, x1, t, sigma_min=0.1, eps=eps)
    np.testing.assert_allclose(b - a, 0.1, atol=1e-6)


def test_loss_is_zero_for_the_true_velocity_and_positive_otherwise(pair):
    x0, x1 = pair
    rng = jax.random.PRNGKey(1)
    exact = flow.flow_matching_loss(lambda x, t: x1 - x0, flow.LINEAR, x0, x1, rng)
    zero = flow.flow_matching_loss(lambda x, t: jnp.zeros_like(x), flow.LINEAR, x0, x1, rng)
    assert float(exact) == pytest.approx(0.0, abs=1e-10)
    assert float(zero) == pytest.approx(float(jnp.mean((x1 - x0) ** 2)), rel=1e-5)


def test_gvp_rejects_sigma_min_and_unknown_schedules_are_named():
    c = base_config()
    c.flow.update(schedule="gvp", sigma_min=0.1)
    with pytest.raises(ConfigError, match=r"config\.flow\.sigma_min"):
        flow.check_config(c)
    c.flow.update(schedule="cosine", sigma_min=0.0)
    with pytest.raises(ConfigError, match=r"config\.flow\.schedule"):
        flow.check_config(c)
