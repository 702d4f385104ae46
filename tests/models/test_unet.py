"""Tests of fmboost_jax/models/unet.py: sizes, initialisation, dropout, dtypes."""

import jax
import jax.flatten_util
import jax.numpy as jnp
import numpy as np
import pytest

from fmboost_jax.config import base_config
from fmboost_jax.models.layers import count_params
from fmboost_jax.models.unet import EfficientUNet, timestep_embedding


def unet(**fields) -> EfficientUNet:
    """The released UNet with `fields` changed."""
    return EfficientUNet(**{**base_config().unet.to_dict(), **fields})


def _small(**kw):
    return unet(**{**dict(model_channels=32, num_res_blocks=1, attention_resolutions=(2,),
                          channel_mult=(1, 2), dim_head=16, num_heads=2), **kw})


def _inputs(b=2, s=8):
    k1, k2, k3 = jax.random.split(jax.random.PRNGKey(0), 3)
    return (jax.random.normal(k1, (b, s, s, 4)), jax.random.uniform(k2, (b,)),
            jax.random.normal(k3, (b, s, s, 4)))


def test_released_config_has_305_806_340_parameters():
    released = unet()
    x = jnp.zeros((1, 64, 64, 4))
    shapes = jax.eval_shape(lambda: released.init(jax.random.PRNGKey(0), x, jnp.zeros((1,)), x))
    assert count_params(shapes["params"]) == 305_806_340


def test_reference_cpu_benchmark_config_has_15_646_916_parameters():
    ref15m = unet(model_channels=64, num_res_blocks=2, attention_resolutions=(4,),
                  channel_mult=(1, 2, 4), dim_head=32)
    x = jnp.zeros((1, 32, 32, 4))
    shapes = jax.eval_shape(lambda: ref15m.init(jax.random.PRNGKey(0), x, jnp.zeros((1,)), x))
    assert count_params(shapes["params"]) == 15_646_916


def test_time_embedding_puts_cosine_first_and_uses_raw_t():
    t = jnp.array([0.0, 0.5, 1.0])
    emb = timestep_embedding(t, 8)
    freqs = np.exp(-np.log(10000.0) * np.arange(4) / 4)
    np.testing.assert_allclose(emb[:, :4], np.cos(np.outer(t, freqs)), atol=1e-6)
    np.testing.assert_allclose(emb[:, 4:], np.sin(np.outer(t, freqs)), atol=1e-6)


def test_fresh_unet_outputs_zero_because_output_conv_is_zero_initialised():
    x, t, ctx = _inputs()
    unet = _small()
    params = jax.jit(unet.init)(jax.random.PRNGKey(1), x, t, ctx)
    out = jax.jit(unet.apply)(params, x, t, ctx)
    assert out.shape == (2, 8, 8, 4)
    assert float(jnp.abs(out).max()) == 0.0
    assert float(jnp.abs(params["params"]["out_2"]["kernel"]).max()) == 0.0


@pytest.mark.parametrize("mean, std", [(0.0, 3e-3), (30.0, 0.05)])
def test_groupnorm_matches_pytorch_formula_with_epsilon_1e_5(mean, std):
    """With a variance comparable to eps, a Flax-default eps (1e-6) would differ by ~40%; with a
    mean 600 times the spread, variance as E[x^2] - E[x]^2 in float32 is off by tens of %."""
    from fmboost_jax.models.unet import _group_norm
    x = mean + std * jax.random.normal(jax.random.PRNGKey(0), (2, 4, 4, 64))
    norm = _group_norm("n", jnp.float32)
    y = norm.apply(norm.init(jax.random.PRNGKey(0), x), x)
    g = np.asarray(x, np.float64).reshape(2, 16, 32, 2)
    mean, var = g.mean(axis=(1, 3), keepdims=True), g.var(axis=(1, 3), keepdims=True)
    want = ((g - mean) / np.sqrt(var + 1e-5)).reshape(x.shape)
    np.testing.assert_allclose(y, want, rtol=1e-3, atol=2e-3)


def _randomised(params, seed=3):
    leaves, tree = jax.tree_util.tree_flatten(params)
    keys = jax.random.split(jax.random.PRNGKey(seed), len(leaves))
    return jax.tree_util.tree_unflatten(
        tree, [0.1 * jax.random.normal(k, leaf.shape) for k, leaf in zip(keys, leaves)])


def test_dropout_is_active_in_training_and_off_in_evaluation():
    x, t, ctx = _inputs()
    unet = _small(dropout=0.5)
    params = _randomised(jax.jit(unet.init)(jax.random.PRNGKey(1), x, t, ctx))
    train = jax.jit(lambda key: unet.apply(params, x, t, ctx, train=True, rngs={"dropout": key}))
    evaluate = jax.jit(lambda: unet.apply(params, x, t, ctx, train=False))
    a, b = train(jax.random.PRNGKey(0)), train(jax.random.PRNGKey(1))
    e1, e2 = evaluate(), evaluate()
    assert float(jnp.abs(a - b).max()) > 1e-3
    np.testing.assert_array_equal(e1, e2)


def test_bfloat16_compute_keeps_float32_params_and_tracks_float32_output():
    x, t, ctx = _inputs()
    f32, bf16 = _small(), _small(dtype=jnp.bfloat16)
    params = _randomised(jax.jit(f32.init)(jax.random.PRNGKey(1), x, t, ctx))
    assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(
        jax.eval_shape(bf16.init, jax.random.PRNGKey(1), x, t, ctx)))
    ref = jax.jit(f32.apply)(params, x, t, ctx)
    low = jax.jit(bf16.apply)(params, x, t, ctx)
    assert low.dtype == jnp.float32
    rel = float(jnp.linalg.norm(low - ref) / jnp.linalg.norm(ref))
    assert 0 < rel < 0.05


def test_wrong_channel_count_names_in_channels():
    x, t, ctx = _inputs()
    unet = _small(in_channels=6)
    with pytest.raises(ValueError, match="in_channels=6"):
        unet.init(jax.random.PRNGKey(0), x, t, ctx)


def test_inputs_that_do_not_suit_the_down_sampling_are_named():
    with pytest.raises(ValueError, match=r"input 6x6 is not a multiple of the total down-sampling 4"):
        _small(channel_mult=(1, 2, 2)).init(jax.random.PRNGKey(0), jnp.zeros((1, 6, 6, 4)),
                                            jnp.zeros((1,)), jnp.zeros((1, 6, 6, 4)))


def test_unpool_init_has_torchs_conv_transpose_bound():
    import torch

    from fmboost_jax.models.unet import UnPool2d
    f, c_in, c_out = 4, 64, 8
    kernel = UnPool2d(c_out, f).init(jax.random.PRNGKey(0), jnp.zeros((1, 2, 2, c_in)))
    kernel = np.asarray(kernel["params"]["kernel"])
    torch_w = torch.nn.ConvTranspose2d(c_in, c_out, f, stride=f).weight.detach().numpy()
    bound = 1 / np.sqrt(c_out * f * f)          # torch: fan_in from dim 1 times the kernel area
    assert np.abs(torch_w).max() <= bound and np.abs(kernel).max() <= bound
    np.testing.assert_allclose(kernel.std(), torch_w.std(), rtol=0.05)


def test_remat_recomputes_the_same_loss_and_gradients_with_the_same_params():
    x, t, ctx = _inputs()
    plain, remat = _small(dropout=0.1), _small(dropout=0.1, remat=True)
    params = jax.jit(plain.init)(jax.random.PRNGKey(1), x, t, ctx)["params"]
    params = jax.tree.map(lambda p: p + 0.01, params)     # a non-zero output conv
    assert jax.tree.structure(jax.eval_shape(remat.init, jax.random.PRNGKey(1), x, t, ctx)[
        "params"]) == jax.tree.structure(params)

    def loss(model, p):
        out = model.apply({"params": p}, x, t, ctx, train=True,
                          rngs={"dropout": jax.random.PRNGKey(2)})
        return jnp.mean(out**2)

    (a, ga), (b, gb) = (jax.jit(jax.value_and_grad(lambda p, m=m: loss(m, p)))(params)
                        for m in (plain, remat))
    np.testing.assert_allclose(b, a, rtol=1e-6)
    u, v = (jax.flatten_util.ravel_pytree(g)[0] for g in (ga, gb))
    np.testing.assert_allclose(v, u, rtol=1e-4, atol=1e-5 * float(jnp.abs(u).max()))
