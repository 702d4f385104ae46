"""Tests of fmboost_jax/coupling.py: up-sampling modes, source, context."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fmboost_jax import noising
from fmboost_jax.coupling import Coupling, noise_upsample, resize
from fmboost_jax.first_stage import IdentityFirstStage


class _DoublingStage(IdentityFirstStage):
    """A first stage whose encoder is visible (x -> 2x), to check PSU encodes."""

    def encode(self, params, images):
        return 2.0 * images

    def decode(self, params, latents):
        return 0.5 * latents


@pytest.fixture
def lowres():
    return jax.random.uniform(jax.random.PRNGKey(0), (2, 4, 4, 3), minval=-1, maxval=1)


def _run(coupling, lowres, stage=None, lowres_z=None, size=16):
    stage = stage or IdentityFirstStage()
    if lowres_z is None and coupling.upsampling_mode != "psu":
        lowres_z = stage.encode({}, lowres)
    return coupling.source_and_context(lowres_z, size, lowres, size, stage, {},
                                       jax.random.PRNGKey(1))


def test_psu_upsamples_in_pixel_space_then_encodes(lowres):
    x0, ctx = _run(Coupling("psu", noising_step=-1), lowres, _DoublingStage())
    want = 2.0 * resize(lowres, (16, 16), "bilinear")
    np.testing.assert_allclose(x0, want, atol=1e-6)
    np.testing.assert_allclose(ctx, want, atol=1e-6)


def test_psu_takes_a_precomputed_high_res_latent_as_it_is(lowres):
    z = jnp.ones((2, 16, 16, 3))
    x0, _ = _run(Coupling("psu", noising_step=-1), lowres, lowres_z=z)
    np.testing.assert_array_equal(x0, z)


def test_bilinear_matches_pytorch_align_corners_false_on_a_known_case():
    z = jnp.array([0.0, 1.0]).reshape(1, 1, 2, 1)
    up = resize(jnp.broadcast_to(z, (1, 2, 2, 1)), (4, 4), "bilinear")
    # torch.nn.functional.interpolate([[0, 1]], size=4, mode="bilinear") row: 0, .25, .75, 1
    np.testing.assert_allclose(up[0, 0, :, 0], [0.0, 0.25, 0.75, 1.0], atol=1e-6)


def test_nearest_and_identity_modes(lowres):
    x0, _ = _run(Coupling("nearest", noising_step=-1), lowres)
    np.testing.assert_array_equal(x0, jnp.repeat(jnp.repeat(lowres, 4, 1), 4, 2))
    z = jnp.zeros((2, 16, 16, 3))
    x0, _ = _run(Coupling("identity", noising_step=-1), lowres, lowres_z=z)
    np.testing.assert_array_equal(x0, z)


def test_noise_upsampling_keeps_one_original_cell_per_block_and_fills_noise(lowres):
    up = noise_upsample(lowres, 16, jax.random.PRNGKey(2))
    np.testing.assert_array_equal(up[:, ::4, ::4], lowres)
    mask = np.ones((16, 16), bool)
    mask[::4, ::4] = False
    filled = np.asarray(up)[:, mask]
    assert abs(filled.std() - 1.0) < 0.15


def test_noising_step_perturbs_the_source_but_not_the_context(lowres):
    x0, ctx = _run(Coupling("psu", noising_step=400), lowres)
    clean = resize(lowres, (16, 16), "bilinear")
    np.testing.assert_allclose(ctx, clean, atol=1e-6)
    a = noising.alpha_bar_at(400)
    resid = (x0 - np.sqrt(a) * clean) / np.sqrt(1 - a)  # the Gaussian noise drawn
    assert abs(float(resid.std()) - 1.0) < 0.15 and abs(float(resid.mean())) < 0.15


def test_start_from_noise_draws_x0_and_always_gives_context(lowres):
    c = Coupling("psu", start_from_noise=True, noising_step=-1, concat_context=False)
    x0, ctx = _run(c, lowres)
    np.testing.assert_allclose(ctx, resize(lowres, (16, 16), "bilinear"), atol=1e-6)
    assert abs(float(x0.std()) - 1.0) < 0.2


def test_no_context_without_concat_context(lowres):
    _, ctx = _run(Coupling("psu", noising_step=-1, concat_context=False), lowres)
    assert ctx is None


def test_context_can_use_its_own_upsampling_mode(lowres):
    c = Coupling("bilinear", upsampling_mode_context="nearest", noising_step=-1)
    x0, ctx = _run(c, lowres)
    np.testing.assert_allclose(x0, resize(lowres, (16, 16), "bilinear", antialias=False), atol=1e-6)
    np.testing.assert_array_equal(ctx, jnp.repeat(jnp.repeat(lowres, 4, 1), 4, 2))


def test_invalid_couplings_name_the_field():
    with pytest.raises(ValueError, match="coupling.upsampling_mode"):
        Coupling("bicubic")
    with pytest.raises(ValueError, match="start_from_noise"):
        Coupling("psu", start_from_noise=True, noising_step=400)
