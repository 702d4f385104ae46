"""Tests of fmboost_jax/cfm/upsampling.py: the up-sampled latent from what the batch holds."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fmboost_jax.cfm.upsampling import LowRes, noise_upsample, resize, upsample
from fmboost_jax.first_stage import IdentityFirstStage


class DoublingStage(IdentityFirstStage):
    """A first stage whose coding is visible (encode x -> 2x, decode z -> z / 2)."""

    def encode(self, params, images):
        return 2.0 * images

    def decode(self, params, latents):
        return 0.5 * latents


@pytest.fixture
def lowres():
    return jax.random.uniform(jax.random.PRNGKey(0), (2, 4, 4, 3), minval=-1, maxval=1)


def _up(mode, lowres, stage=None, size=(16, 16)):
    return upsample(mode, lowres, size, stage or IdentityFirstStage(), {}, jax.random.PRNGKey(1))


def test_psu_upsamples_in_pixel_space_then_encodes(lowres):
    z = _up("psu", LowRes(images=lowres), DoublingStage())
    np.testing.assert_allclose(z, 2.0 * resize(lowres, (16, 16), "bilinear"), atol=1e-6)


def test_psu_decodes_a_low_res_latent_first(lowres):
    z = _up("psu", LowRes(latent=2.0 * lowres), DoublingStage())
    np.testing.assert_allclose(z, 2.0 * resize(lowres, (16, 16), "bilinear"), atol=1e-6)


def test_a_precomputed_psu_latent_is_taken_as_it_is(lowres):
    z = jnp.ones((2, 16, 16, 3))
    np.testing.assert_array_equal(_up("psu", LowRes(images=lowres, psu_latent=z)), z)


def test_latent_modes_encode_the_low_res_images_when_no_latent_is_given(lowres):
    z = _up("nearest", LowRes(images=lowres), DoublingStage())
    np.testing.assert_array_equal(z, 2.0 * jnp.repeat(jnp.repeat(lowres, 4, 1), 4, 2))


def test_latent_modes_refuse_a_batch_with_only_a_psu_latent():
    with pytest.raises(ValueError, match="only a precomputed PSU latent"):
        _up("bilinear", LowRes(psu_latent=jnp.zeros((1, 16, 16, 3))))


def test_bilinear_matches_pytorch_align_corners_false_on_a_known_case():
    z = jnp.array([0.0, 1.0]).reshape(1, 1, 2, 1)
    up = resize(jnp.broadcast_to(z, (1, 2, 2, 1)), (4, 4), "bilinear")
    # torch.nn.functional.interpolate([[0, 1]], size=4, mode="bilinear") row: 0, .25, .75, 1
    np.testing.assert_allclose(up[0, 0, :, 0], [0.0, 0.25, 0.75, 1.0], atol=1e-6)


def test_nearest_and_identity_modes(lowres):
    z = _up("nearest", LowRes(latent=lowres))
    np.testing.assert_array_equal(z, jnp.repeat(jnp.repeat(lowres, 4, 1), 4, 2))
    big = jnp.zeros((2, 16, 16, 3))
    np.testing.assert_array_equal(_up("identity", LowRes(latent=big)), big)
    with pytest.raises(ValueError, match="identity.*16x16, got 4x4"):
        _up("identity", LowRes(latent=lowres))


def test_noise_upsampling_keeps_one_original_cell_per_block_and_fills_noise(lowres):
    up = noise_upsample(lowres, (16, 8), jax.random.PRNGKey(2))
    np.testing.assert_array_equal(up[:, ::4, ::2], lowres)
    mask = np.ones((16, 8), bool)
    mask[::4, ::2] = False
    assert abs(np.asarray(up)[:, mask].std() - 1.0) < 0.15
    with pytest.raises(ValueError, match="not a multiple"):
        noise_upsample(lowres, (10, 10), jax.random.PRNGKey(2))
