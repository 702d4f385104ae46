"""Tests of fmboost_jax/metrics.py."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fmboost_jax.evaluation import metrics


def test_psnr_of_a_known_error():
    a = jnp.zeros((1, 8, 8, 3))
    b = a + 0.2  # 0.1 in [0, 1] units -> MSE 0.01 -> 20 dB
    assert float(metrics.psnr(b, a)[0]) == pytest.approx(20.0, abs=1e-4)


def test_ssim_is_one_for_identical_images_and_lower_for_noisy_ones():
    x = jax.random.uniform(jax.random.PRNGKey(0), (2, 32, 32, 3), minval=-1, maxval=1)
    noisy = x + 0.3 * jax.random.normal(jax.random.PRNGKey(1), x.shape)
    np.testing.assert_allclose(metrics.ssim(x, x), 1.0, atol=1e-5)
    assert float(metrics.ssim(noisy, x).max()) < 0.9


def test_mse_is_per_image_on_the_minus_one_one_values():
    a = jnp.zeros((2, 4, 4, 3))
    b = a.at[0].set(0.5).at[1, 0, 0, 0].set(-2.0)   # unclipped: the [-1, 1] values as given
    np.testing.assert_allclose(metrics.mse(b, a), [0.25, 4.0 / 48], rtol=1e-6)
    assert metrics.mse(b, a).shape == (2,)
