"""Tests of the UNet's attention implementation, a field of the module (`config.unet.attention`):
the same outputs for each, and each a different traced program."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fmboost_jax.config import base_config
from fmboost_jax.models import unet as unet_lib


def _randomised_small_unet():
    """A small UNet with attention at its one level and in the middle, every parameter random
    (the zero-initialised output convs included, so that the output depends on the attention),
    and its inputs."""
    fields = dict(base_config().unet.to_dict(), model_channels=32, num_res_blocks=1,
                  attention_resolutions=(1,), channel_mult=(1,), dim_head=16, num_heads=2)
    model = unet_lib.EfficientUNet(**fields)
    k = jax.random.split(jax.random.PRNGKey(0), 4)
    x, ctx = jax.random.normal(k[0], (2, 8, 8, 4)), jax.random.normal(k[1], (2, 8, 8, 4))
    t = jax.random.uniform(k[2], (2,))
    params = model.init(k[3], x, t, ctx)
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.PRNGKey(1), len(leaves))
    noisy = [a + 0.1 * jax.random.normal(r, a.shape) for a, r in zip(leaves, keys)]
    return model, jax.tree.unflatten(tree, noisy), (x, t, ctx)


def _output(model, params, inputs, implementation: str) -> np.ndarray:
    return np.asarray(model.clone(attention=implementation).apply(params, *inputs))


def test_dot_product_attention_matches_einsum_attention_in_float32():
    model, params, inputs = _randomised_small_unet()
    reference = _output(model, params, inputs, "einsum")
    assert np.abs(reference).max() > 0.1
    for implementation in ("xla", "cudnn"):   # "cudnn" is "xla" for float32
        np.testing.assert_allclose(_output(model, params, inputs, implementation), reference,
                                   atol=1e-5, rtol=1e-5)


def test_the_implementation_is_part_of_what_jit_traces():
    """A field of the module, not global state: one jitted function of the model gives each
    implementation's program (the xla one holds no einsum of q and k)."""
    model, params, inputs = _randomised_small_unet()
    text = {impl: jax.jit(model.clone(attention=impl).apply).lower(params, *inputs).as_text()
            for impl in ("einsum", "xla")}
    assert text["einsum"] != text["xla"]


def test_attention_function_matches_for_each_head_layout():
    k = jax.random.split(jax.random.PRNGKey(2), 3)
    q, kk, v = (jax.random.normal(r, (2, 3, 10, 8)) for r in k)   # (B, heads, L, d)
    expected = unet_lib.softmax_attention(q, kk, v)
    got = unet_lib.softmax_attention(q, kk, v, "xla")
    np.testing.assert_allclose(got, expected, atol=1e-6)
    assert got.shape == q.shape and got.dtype == jnp.float32


def test_an_unknown_implementation_is_refused_naming_the_field_and_the_default_is_einsum():
    from fmboost_jax.errors import ConfigError
    from fmboost_jax.train.setup import validate
    assert base_config().unet.attention == "einsum"
    c = base_config()
    c.unet.attention = "flash"
    with pytest.raises(ConfigError, match=r"config\.unet\.attention: must be one of"):
        validate(c)
    with pytest.raises(ValueError, match="unknown attention implementation 'flash'"):
        unet_lib.softmax_attention(*(jnp.zeros((1, 1, 2, 4)),) * 3, "flash")


def test_long_sequences_attend_in_blocks_of_queries_with_the_whole_sequences_result(monkeypatch):
    """Above ATTENTION_SCORES_BYTES of scores per example the queries go in blocks (the demo's
    middle block at 512² px: 4 GiB whole); each row's softmax is its own, so the result is the
    whole computation's, gradients included."""
    k = jax.random.split(jax.random.PRNGKey(3), 3)
    q, kk, v = (jax.random.normal(r, (2, 3, 96, 8)) for r in k)    # 96 = 32 x 3 queries
    whole = unet_lib.softmax_attention(q, kk, v)
    loss = lambda q, k, v: jnp.sum(unet_lib.softmax_attention(q, k, v) ** 2)
    grads = jax.grad(loss, argnums=(0, 1, 2))(q, kk, v)
    assert unet_lib.query_chunk(4, 128 * 128) == 64               # the demo at 512² px
    assert unet_lib.query_chunk(4, 16 * 16) == 256                # released, 128² latents: whole
    monkeypatch.setattr(unet_lib, "ATTENTION_SCORES_BYTES", 3 * 96 * 4 * 32)   # 32 rows
    assert unet_lib.query_chunk(3, 96) == 32
    text = jax.jit(unet_lib.softmax_attention).lower(q, kk, v).as_text()
    assert "while" in text                                          # a loop over 3 blocks
    np.testing.assert_allclose(unet_lib.softmax_attention(q, kk, v), whole, atol=1e-6)
    for got, expected in zip(jax.grad(loss, argnums=(0, 1, 2))(q, kk, v), grads):
        np.testing.assert_allclose(got, expected, atol=1e-5)
