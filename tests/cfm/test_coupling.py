"""Tests of fmboost_jax/cfm/coupling.py: the source and the context from up-sampled latents."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fmboost_jax.cfm import noising
from fmboost_jax.cfm.coupling import Coupling
from fmboost_jax.config import base_config
from fmboost_jax.errors import ConfigError


def coupling(**fields):
    c = base_config().coupling
    c.update({"noising_step": -1, **fields})
    return Coupling.from_config(c)


@pytest.fixture
def z_up():
    return jax.random.uniform(jax.random.PRNGKey(0), (2, 16, 16, 4), minval=-1, maxval=1)


def test_without_noising_the_source_and_context_are_the_up_sampled_latent(z_up):
    x0, ctx = coupling()(z_up, None, jax.random.PRNGKey(1))
    np.testing.assert_array_equal(x0, z_up)
    np.testing.assert_array_equal(ctx, z_up)


def test_noising_step_perturbs_the_source_but_not_the_context(z_up):
    x0, ctx = coupling(noising_step=400)(z_up, None, jax.random.PRNGKey(1))
    np.testing.assert_array_equal(ctx, z_up)
    a = noising.alpha_bar_at(400)
    resid = (x0 - np.sqrt(a) * z_up) / np.sqrt(1 - a)  # the Gaussian noise drawn
    assert abs(float(resid.std()) - 1.0) < 0.1 and abs(float(resid.mean())) < 0.1


def test_start_from_noise_draws_x0_and_always_gives_context(z_up):
    c = coupling(start_from_noise=True, concat_context=False)
    x0, ctx = c(z_up, None, jax.random.PRNGKey(1))
    np.testing.assert_array_equal(ctx, z_up)
    assert abs(float(x0.std()) - 1.0) < 0.1 and float(jnp.abs(x0 - z_up).mean()) > 0.5


def test_no_context_without_concat_context(z_up):
    assert coupling(concat_context=False)(z_up, None, jax.random.PRNGKey(1))[1] is None


def test_the_context_latent_of_its_own_mode_is_used(z_up):
    c = coupling(upsampling_mode="psu", upsampling_mode_context="bilinear")
    assert c.context_modes == ("psu", "bilinear")
    x0, ctx = c(z_up, -z_up, jax.random.PRNGKey(1))
    np.testing.assert_array_equal(x0, z_up)
    np.testing.assert_array_equal(ctx, -z_up)
    assert coupling(upsampling_mode_context="psu").context_modes == ("psu",)
    assert coupling(upsampling_mode_context="bilinear", concat_context=False).context_modes \
        == ("psu",)


def test_invalid_couplings_name_the_field():
    c = base_config()
    c.coupling.upsampling_mode = "bicubic"
    with pytest.raises(ConfigError, match=r"config\.coupling\.upsampling_mode"):
        from fmboost_jax.cfm.coupling import check_config
        check_config(c)


@pytest.mark.parametrize("fields", [dict(noising_step=400), dict(start_from_noise=True),
                                    dict(noising_step=-1)])
def test_the_source_is_gaussian_with_the_mean_and_std_the_sde_score_assumes(fields):
    c = coupling(**fields)
    z_up = jax.random.uniform(jax.random.PRNGKey(0), (4, 32, 32, 4), minval=-1, maxval=1)
    x0, _ = c(z_up, None, jax.random.PRNGKey(1))
    residual = np.asarray(x0 - c.source_mean(z_up))
    assert abs(residual.mean()) < 0.02
    np.testing.assert_allclose(residual.std(), c.source_std, atol=0.02)
    if fields.get("noising_step", 0) > 0:
        assert c.source_std == pytest.approx(np.sqrt(1 - noising.alpha_bar_at(400)))
