"""Tests of fmboost_jax/models/layers.py: PyTorch's init bound, nearest up-sampling, counts."""

import jax
import jax.numpy as jnp
import numpy as np

from fmboost_jax.models.layers import conv, count_params, dense, upsample_nearest


def test_convs_and_dense_layers_draw_from_torchs_default_uniform_bound():
    x = jnp.zeros((1, 8, 8, 16))
    kernel = conv(32, 3, "c", jnp.float32).init(jax.random.PRNGKey(0), x)["params"]["kernel"]
    bound = 1 / np.sqrt(16 * 3 * 3)                         # 1/sqrt(fan_in), fan_in = in * k^2
    assert float(jnp.abs(kernel).max()) <= bound
    np.testing.assert_allclose(float(kernel.std()), bound / np.sqrt(3), rtol=0.05)  # uniform
    w = dense(64, "d", jnp.float32).init(jax.random.PRNGKey(0), jnp.zeros((1, 256)))
    assert float(jnp.abs(w["params"]["kernel"]).max()) <= 1 / 16
    zero = conv(4, 3, "z", jnp.float32, zero_init=True).init(jax.random.PRNGKey(0), x)
    assert not np.any(np.asarray(zero["params"]["kernel"]))


def test_nearest_up_sampling_repeats_every_pixel():
    x = jnp.arange(4.0).reshape(1, 2, 2, 1)
    up = upsample_nearest(x)
    np.testing.assert_array_equal(up[0, :, :, 0], [[0, 0, 1, 1], [0, 0, 1, 1],
                                                   [2, 2, 3, 3], [2, 2, 3, 3]])


def test_count_params_counts_arrays_and_shapes_alike():
    tree = {"a": jnp.zeros((3, 4)), "b": {"c": jax.ShapeDtypeStruct((5,), jnp.float32)}}
    assert count_params(tree) == 17
