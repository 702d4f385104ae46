"""Tests of fmboost_jax/train/step.py: the update step and where the EMA reads the params."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fmboost_jax.cfm.model import CFM
from fmboost_jax.data import photos
from fmboost_jax.train.state import create_train_state, make_optimizer
from fmboost_jax.train.step import check_finite, make_train_step


@pytest.mark.parametrize("before_update", [True, False])
def test_the_ema_folds_in_the_params_before_or_after_the_update(tiny_config, before_update):
    """Two compiled steps with the EMA averaging from the first one (update_after_step 0): the
    first copies, the second averages with decay 1 - 2^-0.75, of the params before the update
    (the reference) or after it."""
    tiny_config.ema.update(update_after_step=0, before_update=before_update, power=0.75)
    cfm = CFM.from_config(tiny_config)
    tx = make_optimizer(tiny_config.optim)
    state = create_train_state(cfm.init_params(jax.random.PRNGKey(0)), tx, jax.random.PRNGKey(1))
    batch = {"image": jnp.asarray(photos.PhotoCrops(("astronaut",), 16, 4, 0).batch(0)["image"])}
    step = jax.jit(make_train_step(cfm, tx, tiny_config))
    s1, m1 = step(state, {}, batch)
    s2, _ = step(s1, {}, batch)
    first, second = (state, s1) if before_update else (s1, s2)     # what each step averages
    decay = 1.0 - 2.0 ** -0.75
    for e1, e2, p1, p2 in zip(*map(jax.tree.leaves, (s1.ema_params, s2.ema_params,
                                                      first.params, second.params))):
        np.testing.assert_array_equal(e1, p1)                       # step 0: a copy
        np.testing.assert_allclose(e2, decay * np.asarray(p1) + (1 - decay) * np.asarray(p2),
                                   rtol=1e-6, atol=1e-7)
    moved = max(float(np.abs(a - b).max()) for a, b in zip(jax.tree.leaves(first.params),
                                                             jax.tree.leaves(second.params)))
    assert moved > 1e-5                                  # the two params differ: a real average
    assert float(m1["lr"]) == pytest.approx(1e-3 / 2)  # warm-up 2: the first update has lr / 2


def test_a_non_finite_step_names_the_step_and_the_intact_checkpoint():
    check_finite(3, {"loss": 1.0, "grad_norm": 2.0}, None)
    with pytest.raises(FloatingPointError, match=r"step 7: loss nan.*checkpoint \(step 6\)"):
        check_finite(7, {"loss": float("nan"), "grad_norm": 1.0}, 6)


def test_uint8_images_are_converted_on_the_device_bitwise_as_on_the_host(tiny_config):
    """The input pipeline sends uint8 (a quarter of float32's bytes); converted on the device
    they are bitwise the host's float32 pixels, and the step trains as on those (to the
    rounding of another fusion of the same program)."""
    from fmboost_jax.data.images import to_float
    cfm = CFM.from_config(tiny_config)
    tx = make_optimizer(tiny_config.optim)
    state = create_train_state(cfm.init_params(jax.random.PRNGKey(0)), tx, jax.random.PRNGKey(1))
    pixels = np.random.default_rng(0).integers(0, 256, (4, 16, 16, 3), dtype=np.uint8)
    np.testing.assert_array_equal(jax.jit(to_float)(jnp.asarray(pixels)), to_float(pixels))
    step = jax.jit(make_train_step(cfm, tx, tiny_config))
    on_device, m8 = step(state, {}, {"image": jnp.asarray(pixels)})
    on_host, m32 = step(state, {}, {"image": jnp.asarray(to_float(pixels))})
    assert float(m8["loss"]) == pytest.approx(float(m32["loss"]), rel=1e-6)
    for a, b in zip(jax.tree.leaves(on_device.params), jax.tree.leaves(on_host.params)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
