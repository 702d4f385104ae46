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
    """With random params (a velocity that depends on the image) and two images of different
    difficulty, each image's steps are those of solving it alone."""
    cfm, params = cfm_and_params
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.PRNGKey(7), len(leaves))
    params = jax.tree.unflatten(tree, [a + 0.2 * jax.random.normal(k, a.shape)
                                       for a, k in zip(leaves, keys)])
    images = jnp.stack([jnp.zeros_like(lowres[0]), 3.0 * lowres[1]])
    fn = make_sample_fn(cfm, solver="dopri5", per_sample=True, rtol=1e-4, atol=1e-5)
    out = fn(params, {}, images, jax.random.PRNGKey(0))
    assert out.images.shape == (2, 16, 16, 3) and out.stats["nfe"].shape == (2,)
    alone = [int(fn(params, {}, images[i:i + 1], jax.random.PRNGKey(0)).stats["nfe"][0])
             for i in range(2)]
    assert out.stats["nfe"].tolist() == alone and alone[0] != alone[1], alone


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


@pytest.fixture(scope="module")
def noised():
    """The tiny model with the paper's coupling (source noised at step 400), small random
    weights (v != 0)."""
    from support import tiny_pixel_config
    config = tiny_pixel_config()
    config.coupling.update(noising_step=400, context_dropout=0.1)
    cfm = CFM.from_config(config)
    params = jax.tree.map(lambda p: p + 0.01, cfm.init_params(jax.random.PRNGKey(0)))
    return config, cfm, params


@pytest.mark.parametrize("solver,nfe", [("euler_maruyama", 3 + 1), ("sde_heun", 2 * 3 + 1)])
def test_sde_solvers_sample_the_noised_coupling(noised, lowres, solver, nfe):
    _, cfm, params = noised
    sample = make_sample_fn(cfm, solver=solver, num_steps=3, save_intermediates=2)
    out = sample(params, {}, lowres, jax.random.PRNGKey(0))
    assert out.images.shape == (2, 16, 16, 3) and int(out.stats["nfe"]) == nfe
    assert int(out.stats["success"]) == 1 and out.intermediates.shape == (3, 2, 16, 16, 3)
    again = sample(params, {}, lowres, jax.random.PRNGKey(0))
    np.testing.assert_array_equal(out.images, again.images)      # explicit keys
    other = sample(params, {}, lowres, jax.random.PRNGKey(1))
    assert float(jnp.max(jnp.abs(out.images - other.images))) > 1e-3


def test_num_points_is_the_references_time_point_convention(cfm_and_params, lowres):
    cfm, params = cfm_and_params
    params = jax.tree.map(lambda p: p + 0.01, params)
    key = jax.random.PRNGKey(0)
    by_points = make_sample_fn(cfm, solver="rk4", num_points=40)(params, {}, lowres, key)
    by_steps = make_sample_fn(cfm, solver="rk4", num_steps=39)(params, {}, lowres, key)
    np.testing.assert_array_equal(by_points.images, by_steps.images)
    assert int(by_points.stats["nfe"]) == 156          # the reference's validation sampler


def test_guidance_scale_one_is_plain_conditional_sampling(noised, lowres):
    _, cfm, params = noised
    key = jax.random.PRNGKey(0)
    for solver in ("heun", "euler_maruyama"):
        plain = make_sample_fn(cfm, solver=solver, num_steps=2)(params, {}, lowres, key)
        guided = make_sample_fn(cfm, solver=solver, num_steps=2, guidance_scale=1.0)(
            params, {}, lowres, key)
        np.testing.assert_array_equal(plain.images, guided.images)
        assert int(plain.stats["nfe"]) == int(guided.stats["nfe"])


def test_guidance_mixes_both_velocities_in_one_doubled_evaluation(noised, lowres):
    _, cfm, params = noised
    x = jax.random.normal(jax.random.PRNGKey(2), (2, 16, 16, 3))
    ctx = jax.random.normal(jax.random.PRNGKey(3), (2, 16, 16, 3))
    t = jnp.float32(0.3)
    v_c = cfm.velocity(params, x, t, ctx)
    v_u = cfm.velocity(params, x, t, jnp.zeros_like(ctx))
    assert float(jnp.max(jnp.abs(v_c - v_u))) > 1e-4
    for w in (0.0, 2.5):
        np.testing.assert_allclose(cfm.guided_velocity(params, x, t, ctx, w),
                                   v_u + w * (v_c - v_u), rtol=1e-5, atol=1e-5)
    out = make_sample_fn(cfm, solver="heun", num_steps=2, guidance_scale=2.0)(
        params, {}, lowres, jax.random.PRNGKey(0))
    assert int(out.stats["nfe"]) == 2 * 4               # both halves counted


def test_context_dropout_zeroes_whole_contexts_at_its_rate(noised):
    _, cfm, _ = noised
    ctx = jnp.ones((2000, 2, 2, 3))
    dropped = cfm.coupling.drop_context(ctx, jax.random.PRNGKey(0))
    per_sample = np.asarray(dropped).reshape(2000, -1)
    assert set(np.unique(per_sample.min(1))) <= {0.0, 1.0}           # whole samples
    assert np.array_equal(per_sample.min(1), per_sample.max(1))
    assert abs(float((per_sample[:, 0] == 0).mean()) - 0.1) < 0.03


def test_context_dropout_trains_on_the_zero_context(noised):
    config, _, params = noised
    batch = {"image": jax.random.uniform(jax.random.PRNGKey(4), (4, 16, 16, 3), minval=-1,
                                         maxval=1)}
    key = jax.random.PRNGKey(5)
    config = config.copy_and_resolve_references()
    config.coupling.context_dropout = 0.999999                  # every context dropped
    always = CFM.from_config(config)
    zero_ctx = lambda p, fs, b, r: always.loss(p, fs, b, r)
    config.coupling.context_dropout = 0.0
    never = CFM.from_config(config)
    loss_dropped = float(zero_ctx(params, {}, batch, key))
    assert loss_dropped != float(never.loss(params, {}, batch, key))
    # the same loss as a model whose velocity sees zeros for a context
    x0, x1, ctx = never.prepare({}, batch, jax.random.split(key, 4)[0])
    from fmboost_jax.cfm import flow
    v = lambda x, t: never.velocity(params, x, t, jnp.zeros_like(ctx), train=True,
                                    rng=jax.random.split(key, 4)[2])
    want = flow.flow_matching_loss(v, never.path, x0, x1, jax.random.split(key, 4)[1])
    np.testing.assert_allclose(loss_dropped, float(want), rtol=1e-6)
    assert float(never.loss(params, {}, batch, key, train=False)) == float(
        always.loss(params, {}, batch, key, train=False))         # evaluation keeps the context


def test_an_sde_solver_on_a_source_without_noise_is_refused_not_nan(cfm_and_params, lowres):
    cfm, params = cfm_and_params                       # the tiny config: noising_step -1
    with pytest.raises(ValueError, match="needs a noised source"):
        make_sample_fn(cfm, solver="euler_maruyama", num_steps=2)(params, {}, lowres,
                                                                  jax.random.PRNGKey(0))
