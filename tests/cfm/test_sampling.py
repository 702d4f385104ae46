"""Tests of fmboost_jax/cfm/sampling.py: the jitted sample function."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fmboost_jax.cfm.model import CFM
from fmboost_jax.cfm.sampling import make_sample_fn, sampling_params
from fmboost_jax.cfm.upsampling import resize
from fmboost_jax.train.state import TrainState


@pytest.fixture(scope="module")
def cfm_and_params():
    from support import tiny_pixel_config
    cfm = CFM.from_config(tiny_pixel_config())
    return cfm, jax.jit(cfm.init_params)(jax.random.PRNGKey(0))


@pytest.fixture(scope="module")
def lowres():
    return jax.random.uniform(jax.random.PRNGKey(1), (2, 4, 4, 3), minval=-1, maxval=1)


def test_untrained_model_returns_the_bilinear_source(cfm_and_params, lowres):
    cfm, params = cfm_and_params  # zero output conv: v = 0, so x1 = x0 = bilinear(lowres)
    out = make_sample_fn(cfm, solver="euler", num_steps=3)(params, {}, lowres, jax.random.PRNGKey(0))
    np.testing.assert_allclose(out.images, resize(lowres, (16, 16), "bilinear"), atol=1e-6)
    assert int(out.stats["nfe"]) == 3 and out.intermediates is None


def test_sampling_follows_a_known_constant_velocity(cfm_and_params, lowres):
    cfm, params = cfm_and_params
    params = jax.tree.map(jnp.copy, params)
    params["out_2"]["bias"] = jnp.array([0.1, -0.2, 0.3])  # v = constant per channel
    for solver in ("dopri5", "rk4", "heun"):
        out = make_sample_fn(cfm, solver=solver, num_steps=4)(params, {}, lowres,
                                                              jax.random.PRNGKey(0))
        want = resize(lowres, (16, 16), "bilinear") + jnp.array([0.1, -0.2, 0.3])
        np.testing.assert_allclose(out.images, want, atol=1e-5)
        assert int(out.stats["nfe"]) > 0


def test_dopri5_reports_its_evaluations_and_intermediates(cfm_and_params, lowres):
    cfm, params = cfm_and_params
    out = make_sample_fn(cfm, solver="dopri5", save_intermediates=4)(
        params, {}, lowres, jax.random.PRNGKey(0))
    steps = int(out.stats["num_accepted_steps"]) + int(out.stats["num_rejected_steps"])
    assert int(out.stats["nfe"]) == 1 + 6 * steps
    assert out.intermediates.shape == (5, 2, 16, 16, 3)
    np.testing.assert_allclose(out.intermediates[-1], out.latents, atol=1e-6)


def test_per_sample_solving_gives_each_image_its_own_stats(cfm_and_params, lowres):
    cfm, params = cfm_and_params
    out = make_sample_fn(cfm, solver="dopri5", per_sample=True)(params, {}, lowres,
                                                                jax.random.PRNGKey(0))
    assert out.images.shape == (2, 16, 16, 3) and out.stats["nfe"].shape == (2,)


def test_the_output_size_follows_the_input_and_each_option_set_compiles_once(cfm_and_params):
    cfm, params = cfm_and_params
    sample = make_sample_fn(cfm, solver="euler", num_steps=2)
    for seed in range(3):      # new values, same shapes: no new compilation
        lowres = jax.random.uniform(jax.random.PRNGKey(seed), (1, 6, 8, 3), minval=-1, maxval=1)
        out = sample(params, {}, lowres, jax.random.PRNGKey(seed))
        np.testing.assert_allclose(out.images, resize(lowres, (24, 32), "bilinear"), atol=1e-6)
    assert sample._cache_size() == 1
    sample(params, {}, jnp.zeros((1, 4, 4, 3)), jax.random.PRNGKey(0))   # a new shape: one more
    assert sample._cache_size() == 2


def test_sampling_params_prefer_ema():
    state = TrainState(step=jnp.array(0), params={"w": 1}, ema_params={"w": 2},
                       opt_state=None, rng=None)
    assert sampling_params(state) == {"w": 2}
    assert sampling_params(state, use_ema=False) == {"w": 1}
