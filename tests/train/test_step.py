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
    tiny_config.unet.update(channel_mult=(1,), attention_resolutions=())
    tiny_config.ema.update(update_after_step=10, before_update=before_update)   # copies
    cfm = CFM.from_config(tiny_config)
    tx = make_optimizer(tiny_config.optim)
    state = create_train_state(cfm.init_params(jax.random.PRNGKey(0)), tx, jax.random.PRNGKey(1))
    batch = {"image": jnp.asarray(photos.PhotoCrops(("astronaut",), 16, 4, 0).batch(0)["image"])}
    step = jax.jit(make_train_step(cfm, tx, tiny_config))
    s1, m1 = step(state, {}, batch)
    s2, _ = step(s1, {}, batch)
    want = (s1 if before_update else s2).params       # the reference: one step behind
    for e, p in zip(jax.tree.leaves(s2.ema_params), jax.tree.leaves(want)):
        np.testing.assert_array_equal(e, p)
    assert float(m1["lr"]) == pytest.approx(1e-3 / 2)  # warm-up 2: the first update has lr / 2


def test_a_non_finite_step_names_the_step_and_the_intact_checkpoint():
    check_finite(3, {"loss": 1.0, "grad_norm": 2.0}, None)
    with pytest.raises(FloatingPointError, match=r"step 7: loss nan.*checkpoint \(step 6\)"):
        check_finite(7, {"loss": float("nan"), "grad_norm": 1.0}, 6)
