"""No random key is used twice in one loss or one sampler call (fmboost_jax/cfm/model.py,
cfm/sampling.py): with JAX's partitionable threefry `fold_in(k, i)` equals `split(k, n)[i]`, so a
key that is split and also folded or drawn from hands the same bits to two draws.

The calls run eagerly with `jax.random` wrapped to record each key it is given (draws, splits,
folds); a key may serve several folds with distinct data (a family, as per-step keys are) and
nothing else twice."""

import collections
import contextlib

import jax
import numpy as np
import pytest
from support import tiny_pixel_config

from fmboost_jax.cfm.model import CFM
from fmboost_jax.cfm.sampling import make_sample_fn

OPS = ("split", "fold_in", "normal", "uniform", "bernoulli", "randint", "permutation")


@contextlib.contextmanager
def recorded_keys(monkeypatch):
    """{key bytes: [(op, fold data or None), ...]} of every concrete key handed to `OPS`."""
    uses = collections.defaultdict(list)
    for op in OPS:
        original = getattr(jax.random, op)

        def wrapper(key, *args, _op=op, _original=original, **kwargs):
            try:
                raw = np.asarray(jax.random.key_data(key)).tobytes()
            except Exception:          # a traced key (inside a scan): not recorded
                raw = None
            if raw is not None:
                data = int(np.asarray(args[0])) if _op == "fold_in" else None
                uses[raw].append((_op, data))
            return _original(key, *args, **kwargs)

        monkeypatch.setattr(jax.random, op, wrapper)
    with jax.disable_jit():
        yield uses


def reused(uses) -> list:
    """The keys used twice: more than once, unless every use is a fold with its own data."""
    bad = []
    for ops in uses.values():
        folds = [d for op, d in ops if op == "fold_in"]
        if len(ops) > 1 and not (len(folds) == len(ops) == len(set(folds))):
            bad.append(ops)
    return bad


@pytest.fixture(scope="module")
def noised_cfm():
    """The paper's coupling with context dropout and sigma_min: every draw of the loss."""
    config = tiny_pixel_config()
    config.coupling.update(noising_step=400, context_dropout=0.5)
    config.flow.sigma_min = 1e-3
    cfm = CFM.from_config(config)
    return cfm, cfm.init_params(jax.random.PRNGKey(0))


def test_one_loss_call_uses_every_key_once(noised_cfm, monkeypatch):
    cfm, params = noised_cfm
    images = jax.random.uniform(jax.random.PRNGKey(1), (4, 16, 16, 3), minval=-1, maxval=1)
    with recorded_keys(monkeypatch) as uses:
        cfm.loss(params, {}, {"image": images}, jax.random.PRNGKey(2), True)
    draws = sum(op not in ("split", "fold_in") for ops in uses.values() for op, _ in ops)
    assert draws >= 4, uses               # coupling noise, t, eps, the context-dropout mask
    assert not reused(uses), reused(uses)


@pytest.mark.parametrize("solver", ["euler", "euler_maruyama"])
def test_one_sampler_call_uses_every_key_once(noised_cfm, monkeypatch, solver):
    cfm, params = noised_cfm
    lowres = jax.random.uniform(jax.random.PRNGKey(1), (2, 4, 4, 3), minval=-1, maxval=1)
    with recorded_keys(monkeypatch) as uses:
        make_sample_fn(cfm, solver=solver, num_steps=2)(params, {}, lowres, jax.random.PRNGKey(3))
    assert uses and not reused(uses), reused(uses)
