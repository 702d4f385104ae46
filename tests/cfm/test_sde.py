"""Tests of fmboost_jax/cfm/sde.py: the score for the noised coupling, and the SDE samplers.

The closed-form problem: data x1 ~ N(mu1, diag(var1)) and a source x0 ~ N(m, s^2 I) given the
context, independent. Then x_t is Gaussian with known mean and variance, and the exact velocity
E[u_t | x_t] and score are linear in x_t.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fmboost_jax.cfm import noising, sde
from fmboost_jax.cfm.flow import PATHS

D = 6
MU1 = jnp.linspace(-1.0, 2.0, D)
VAR1 = jnp.linspace(0.2, 1.5, D)
ABAR = noising.alpha_bar_at(400)
SOURCES = {   # m, s: the noised PSU latent z (per dim) and pure noise
    "noised": (math.sqrt(ABAR) * jnp.linspace(0.5, -1.0, D), math.sqrt(1.0 - ABAR)),
    "noise": (jnp.zeros(D), 1.0),
}


def exact(path, m, s, t, sigma_min=0.0):
    """Mean, variance of x_t and the exact velocity as a function of x."""
    a, da, sg, ds = path.alpha(t), path.d_alpha(t), path.sigma(t), path.d_sigma(t)
    mean = a * MU1 + sg * m
    var = a ** 2 * VAR1 + sg ** 2 * s ** 2 + sigma_min ** 2
    cov_u_x = da * a * VAR1 + ds * sg * s ** 2         # Cov(u_t, x_t), u_t = a' x1 + s' x0
    velocity = lambda x: da * MU1 + ds * m + cov_u_x / var * (x - mean)
    return mean, var, velocity


def reference_score(path, v, x, t):
    """The reference's `get_score_from_velocity` (assumes x0 ~ N(0, I))."""
    a, da, sg, ds = path.alpha(t), path.d_alpha(t), path.sigma(t), path.d_sigma(t)
    r = a / da
    return (r * v - x) / (sg ** 2 - r * ds * sg)


@pytest.mark.parametrize("schedule", ["linear", "gvp"])
@pytest.mark.parametrize("source_name", ["noised", "noise"])
def test_the_score_from_the_exact_velocity_is_the_exact_score(schedule, source_name):
    path, (m, s) = PATHS[schedule], SOURCES[source_name]
    x = jax.random.normal(jax.random.PRNGKey(0), (16, D)) * 1.5
    for t in (0.0, 0.1, 0.5, 0.9, 0.96):
        t = jnp.float32(t)
        mean, var, velocity = exact(path, m, s, t)
        want = -(x - mean) / var
        got = sde.score_from_velocity(path, velocity(x), x, t, sde.Source(m, s))
        tol = 1e-4 * float(jnp.max(jnp.abs(want)))      # float32 round-off near t = 1
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=tol)
        ref = reference_score(path, velocity(x), x, t)
        if source_name == "noise":         # the reference's case: its formula agrees
            np.testing.assert_allclose(ref, want, rtol=1e-4, atol=tol)
        elif t > 0:                        # the paper's coupling: the reference's formula is off
            assert float(jnp.max(jnp.abs(ref - want))) > 0.1


@pytest.mark.parametrize("source_name", ["noised", "noise"])
def test_the_score_holds_with_sigma_min(source_name):
    path, (m, s) = PATHS["linear"], SOURCES[source_name]
    x = jax.random.normal(jax.random.PRNGKey(1), (16, D))
    for t in (0.3, 0.99, 1.0):            # finite up to t = 1 with sigma_min > 0
        t = jnp.float32(t)
        mean, var, velocity = exact(path, m, s, t, sigma_min=0.1)
        got = sde.score_from_velocity(path, velocity(x), x, t, sde.Source(m, s), sigma_min=0.1)
        np.testing.assert_allclose(got, -(x - mean) / var, rtol=1e-3, atol=1e-3)


def test_time_may_be_per_sample():
    path, (m, s) = PATHS["linear"], SOURCES["noised"]
    x = jax.random.normal(jax.random.PRNGKey(2), (3, 2, 2, D))
    t = jnp.array([0.2, 0.5, 0.8])
    v = jnp.ones_like(x)
    got = sde.score_from_velocity(path, v, x, t, sde.Source(jnp.broadcast_to(m, x.shape), s))
    for i in range(3):
        one = sde.score_from_velocity(path, v[i:i + 1], x[i:i + 1], t[i],
                                      sde.Source(jnp.broadcast_to(m, x[:1].shape), s))
        np.testing.assert_allclose(got[i:i + 1], one, rtol=1e-6)


def gaussian_problem(schedule, source_name, n=4000):
    path, (m, s) = PATHS[schedule], SOURCES[source_name]
    x0 = m + s * jax.random.normal(jax.random.PRNGKey(3), (n, D))
    velocity = lambda t, x, args: exact(path, m, s, t)[2](x)
    return path, sde.Source(jnp.broadcast_to(m, x0.shape), s), x0, velocity


@pytest.mark.parametrize("solver,num_steps", [("euler_maruyama", 60), ("sde_heun", 30)])
@pytest.mark.parametrize("schedule,source_name", [("linear", "noised"), ("gvp", "noise")])
def test_sde_sampling_with_the_exact_velocity_reaches_the_data_distribution(
        solver, num_steps, schedule, source_name):
    path, source, x0, velocity = gaussian_problem(schedule, source_name)
    res = jax.jit(lambda x, key: sde.integrate(velocity, x, key, path=path, source=source,
                                               solver=solver, num_steps=num_steps))(
        x0, jax.random.PRNGKey(4))
    x1 = np.asarray(res.x1)
    np.testing.assert_allclose(x1.mean(0), MU1, atol=0.08)
    np.testing.assert_allclose(x1.var(0), VAR1, rtol=0.12, atol=0.03)
    # The noise matters: the SDE's samples are not the ODE's (a deterministic map of x0).
    assert int(res.stats["success"]) == 1


@pytest.mark.parametrize("form", sde.DIFFUSION_FORMS)
def test_every_diffusion_form_keeps_the_marginals(form):
    path, source, x0, velocity = gaussian_problem("linear", "noised", n=3000)
    # "Mean" takes the last step without noise: right where D(1) = 0, as for every form but
    # "constant", whose last step must be "Euler" (the velocity alone).
    last_step = "Euler" if form == "constant" else "Mean"
    res = sde.integrate(velocity, x0, jax.random.PRNGKey(5), path=path, source=source,
                        solver="sde_heun", num_steps=40, diffusion_form=form,
                        last_step=last_step)
    x1 = np.asarray(res.x1)
    assert np.isfinite(x1).all()
    np.testing.assert_allclose(x1.mean(0), MU1, atol=0.1)
    np.testing.assert_allclose(x1.var(0), VAR1, rtol=0.15, atol=0.05)


def test_a_noiseless_last_step_under_a_constant_diffusion_shrinks_the_variance():
    path, source, x0, velocity = gaussian_problem("linear", "noised", n=3000)
    res = sde.integrate(velocity, x0, jax.random.PRNGKey(5), path=path, source=source,
                        solver="sde_heun", num_steps=40, diffusion_form="constant")
    assert float(np.asarray(res.x1).var(0)[0]) < 0.75 * float(VAR1[0])


def test_the_diffusion_forms_are_the_references():
    path, t = PATHS["linear"], jnp.float32(0.25)
    want = {"constant": 2.0, "SBDM": 2.0 * (1 / 0.25 * 0.75 ** 2 + 0.75), "sigma": 2.0 * 0.75,
            "linear": 2.0 * 0.75, "decreasing": 0.25 * (2.0 * math.cos(math.pi / 4) + 1) ** 2,
            "increasing-decreasing": 2.0 * math.sin(math.pi / 4) ** 2}
    for form, value in want.items():
        np.testing.assert_allclose(sde.diffusion(path, t, form, 2.0), value, rtol=1e-6)
    assert float(sde.diffusion(path, jnp.float32(0.0), "SBDM", 1.0)) == 0.0   # not inf


@pytest.mark.parametrize("solver,last_step,per_step,last", [
    ("euler_maruyama", "Mean", 1, 1), ("euler_maruyama", "none", 1, 0),
    ("sde_heun", "Mean", 2, 1), ("sde_heun", "Euler", 2, 1)])
def test_nfe_counts_every_network_evaluation_once(solver, last_step, per_step, last):
    path, source, x0, velocity = gaussian_problem("linear", "noised", n=4)
    calls = []

    def counted(t, x, args):
        calls.append(t)
        return velocity(t, x, args)

    with jax.disable_jit():      # the scan runs as a Python loop: one call per evaluation
        res = sde.integrate(counted, x0, jax.random.PRNGKey(0), path=path, source=source,
                            solver=solver, num_steps=5, last_step=last_step)
    assert len(calls) == int(res.stats["nfe"]) == 5 * per_step + last
    assert int(res.stats["num_steps"]) == 5 + last


def test_the_time_grid_ends_last_step_size_before_one():
    np.testing.assert_allclose(sde.time_grid(4, "Mean", 0.04), np.linspace(0, 0.96, 5))
    np.testing.assert_allclose(sde.time_grid(4, "none", 0.04), np.linspace(0, 1, 5))


def test_intermediates_run_from_x0_to_x1():
    path, source, x0, velocity = gaussian_problem("linear", "noised", n=8)
    res = sde.integrate(velocity, x0, jax.random.PRNGKey(0), path=path, source=source,
                        num_steps=8, save_intermediates=4)
    assert res.intermediates.shape == (5, 8, D)
    np.testing.assert_array_equal(res.intermediates[0], x0)
    np.testing.assert_array_equal(res.intermediates[-1], res.x1)


def test_the_same_key_gives_the_same_sample_and_another_key_another():
    path, source, x0, velocity = gaussian_problem("linear", "noised", n=8)
    run = lambda seed: sde.integrate(velocity, x0, jax.random.PRNGKey(seed), path=path,
                                     source=source, num_steps=4).x1
    np.testing.assert_array_equal(run(0), run(0))
    assert float(jnp.max(jnp.abs(run(0) - run(1)))) > 1e-3


@pytest.mark.parametrize("kwargs,named", [
    (dict(solver="rk4"), "SDE solver"), (dict(diffusion_form="cosine"), "diffusion form"),
    (dict(last_step="Tweedie"), "last step"), (dict(last_step_size=0.0), "last_step_size"),
    (dict(solver="sde_heun", last_step="none"), "evaluates the drift at t = 1")])
def test_bad_options_are_named(kwargs, named):
    path, source, x0, velocity = gaussian_problem("linear", "noised", n=2)
    with pytest.raises(ValueError, match=named):
        sde.integrate(velocity, x0, jax.random.PRNGKey(0), path=path, source=source,
                      num_steps=2, **kwargs)
