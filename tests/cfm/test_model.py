"""Tests of fmboost_jax/cfm/model.py: the training pair of every coupling, in pixel space and in
a VAE's latent space, precomputed latents, and output sizes that follow the input."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from support import config, flat_unet, tiny_pixel_config

from fmboost_jax.cfm.model import CFM
from fmboost_jax.cfm.upsampling import LowRes, upsample
from fmboost_jax.data import photos
from fmboost_jax.errors import ConfigError
from fmboost_jax.first_stage import AutoencoderFirstStage
from fmboost_jax.train.setup import validate

MODES = ("psu", "bilinear", "nearest", "noise_upsampling")
PAIRS = list(itertools.product(MODES, MODES + ("",)))


def _cfm(space: str, mode: str, context_mode: str, upscale_one: bool = False):
    c = tiny_pixel_config() if space == "pixels" else config("lhq:smoke")
    c.coupling.update(upsampling_mode=mode, upsampling_mode_context=context_mode,
                      noising_step=-1)
    flat_unet(c)                                      # the couplings do not depend on it
    if upscale_one:
        c.low_res_size = c.high_res_size
    validate(c)
    cfm = CFM.from_config(c)
    return cfm, cfm.first_stage.init_params(jax.random.PRNGKey(0)), c.high_res_size


@pytest.fixture(scope="module")
def images():
    return {s: jnp.asarray(photos.PhotoCrops(("astronaut",), s, 2, 0).batch(0)["image"])
            for s in (16, 64)}


@pytest.mark.parametrize("space", ["pixels", "vae"])
@pytest.mark.parametrize("mode,context_mode", PAIRS)
def test_every_upsampling_pair_gives_the_source_and_context_of_its_modes(space, mode,
                                                                       context_mode, images):
    cfm, fs_params, size = _cfm(space, mode, context_mode)
    x0, x1, ctx = cfm.prepare(fs_params, {"image": images[size]}, jax.random.PRNGKey(1))
    assert x0.shape == x1.shape == ctx.shape
    lowres = LowRes(images=cfm.lowres_images(images[size]))
    for got, m in ((x0, mode), (ctx, context_mode or mode)):
        if m != "noise_upsampling":          # the others are deterministic
            want = upsample(m, lowres, x1.shape[1:3], cfm.first_stage, fs_params, None)
            np.testing.assert_allclose(got, want, atol=1e-5)


@pytest.mark.parametrize("space", ["pixels", "vae"])
def test_identity_takes_the_latent_as_it_is_and_needs_equal_sizes(space, images):
    cfm, fs_params, size = _cfm(space, "identity", "", upscale_one=True)
    x0, x1, ctx = cfm.prepare(fs_params, {"image": images[size]}, jax.random.PRNGKey(1))
    np.testing.assert_allclose(x0, x1, atol=1e-5)          # the image is its own low-res version
    c = tiny_pixel_config()
    c.coupling.update(upsampling_mode="nearest", upsampling_mode_context="identity")
    with pytest.raises(ConfigError, match=r"config\.coupling\.upsampling_mode_context.*identity"):
        validate(c)


def test_the_loss_of_a_psu_source_takes_its_context_from_the_context_mode(images):
    """PSU source, bilinear context: the loss is that of a network that sees the bilinear
    up-sampled latent (not the PSU one), with every parameter random so the context matters."""
    from fmboost_jax.cfm import flow
    cfm, fs_params, _ = _cfm("vae", "psu", "bilinear")
    init = cfm.init_params(jax.random.PRNGKey(2))
    leaves, tree = jax.tree.flatten(init)
    keys = jax.random.split(jax.random.PRNGKey(5), len(leaves))
    params = jax.tree.unflatten(tree, [a + 0.05 * jax.random.normal(k, a.shape)
                                       for a, k in zip(leaves, keys)])
    rng = jax.random.PRNGKey(3)
    loss = float(cfm.loss(params, fs_params, {"image": images[64]}, rng))
    prep_rng, loss_rng, drop_rng, _ = jax.random.split(rng, 4)      # the loss's key layout
    x0, x1, _ = cfm.prepare(fs_params, {"image": images[64]}, prep_rng)
    lowres = LowRes(images=cfm.lowres_images(images[64]))

    def with_context(mode):
        ctx = upsample(mode, lowres, x1.shape[1:3], cfm.first_stage, fs_params, None)
        v = lambda x, t: cfm.velocity(params, x, t, ctx, train=True, rng=drop_rng)
        return float(flow.flow_matching_loss(v, cfm.path, x0, x1, loss_rng, cfm.sigma_min))
    assert loss == pytest.approx(with_context("bilinear"), rel=1e-5)
    assert abs(loss - with_context("psu")) > 1e-3 * loss


def test_precomputed_latents_give_the_pairs_encoding_on_the_fly_gives(images):
    cfm, fs_params, _ = _cfm("vae", "psu", "")
    fs = cfm.first_stage
    assert isinstance(fs, AutoencoderFirstStage)
    x = images[64]
    psu = upsample("psu", LowRes(images=cfm.lowres_images(x)), (8, 8), fs, fs_params, None)
    stored = {"image": x,
              "latent": fs.moments(fs_params, x)[0],                            # unscaled
              "latent_lowres": psu / fs.scale_factor + fs.shift_factor}          # unscaled
    rng = jax.random.PRNGKey(1)
    for a, b in zip(cfm.prepare(fs_params, {"image": x}, rng), cfm.prepare(fs_params, stored, rng)):
        np.testing.assert_allclose(a, b, atol=1e-5)


def test_latent_sizes_follow_the_input_and_unsuitable_sizes_are_named():
    cfm = CFM.from_config(config("lhq:smoke"))        # VAE factor 8, UNet down-sampling 1
    assert cfm.upscale == 2 and cfm.size_multiple == 8
    assert cfm.latent_size((64, 64)) == (8, 8)
    assert cfm.latent_size((96, 128)) == (12, 16)
    with pytest.raises(ValueError, match=r"output size 68x68 px is not a multiple of 8"):
        cfm.latent_size((68, 68))


def test_the_regression_baseline_predicts_x1_in_one_pass_with_the_same_unet(images):
    c = tiny_pixel_config()
    cfm_model = CFM.from_config(c)
    from fmboost_jax.config import as_regression
    as_regression(c)
    validate(c)
    reg = CFM.from_config(c)
    params = reg.init_params(jax.random.PRNGKey(0))
    count = lambda p: sum(x.size for x in jax.tree.leaves(p))
    assert count(params) == count(cfm_model.init_params(jax.random.PRNGKey(0)))
    batch, key = {"image": images[16]}, jax.random.PRNGKey(1)
    x0, x1, ctx = reg.prepare({}, batch, jax.random.split(key, 3)[0])
    np.testing.assert_array_equal(x0, ctx)                    # the clean up-sampled image
    # the zero output layer: the prediction is the up-sampled image, the loss their MSE
    np.testing.assert_allclose(reg.loss(params, {}, batch, key), jnp.mean((x0 - x1) ** 2),
                               rtol=1e-6)
    params = jax.tree.map(lambda p: p + 0.01, params)
    want = jnp.mean((x0 + reg.velocity(params, x0, jnp.zeros(2), ctx) - x1) ** 2)
    np.testing.assert_allclose(reg.loss(params, {}, batch, key, train=False), want, rtol=1e-5)

    from fmboost_jax.cfm.sampling import make_sample_fn
    lowres = reg.lowres_images(images[16])
    out = make_sample_fn(reg, solver="dopri5", save_intermediates=2)(params, {}, lowres, key)
    assert int(out.stats["nfe"]) == 1 and out.intermediates.shape == (3, 2, 16, 16, 3)
    x0s, _, ctxs = reg.couple({}, LowRes(images=lowres), (16, 16), key)
    np.testing.assert_allclose(out.images, reg.regress(params, x0s, ctxs), rtol=1e-6, atol=1e-6)


def test_a_regression_model_takes_the_clean_latent():
    c = config("lhq:smoke")
    c.objective = "regression"                              # noising_step 400 left on
    with pytest.raises(ConfigError, match="config.coupling.noising_step"):
        validate(c)
    validate(config("lhq:smoke,regression"))
