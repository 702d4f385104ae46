"""Tests of fmboost_jax/first_stage/vae.py: scaling, shifting, and a missing checkpoint."""


import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from vae_oracle import photo  # noqa: E402

from fmboost_jax.first_stage import AutoencoderFirstStage  # noqa: E402
from fmboost_jax.models import autoencoder as ae  # noqa: E402


def test_first_stage_scales_and_shifts_and_decode_inverts_it():
    cfg = ae.preset("flux", ch=32, ch_mult=(1, 1, 1, 1), num_res_blocks=1)
    fs = AutoencoderFirstStage(cfg, checkpoint="random")
    params = fs.init_params(jax.random.PRNGKey(0))
    x = jnp.asarray(photo(32))
    mean, logvar = fs.moments(params, x)
    np.testing.assert_allclose(fs.encode(params, x), (mean - 0.1159) * 0.3611, rtol=1e-6)
    raw = fs.model.apply({"params": params}, mean, method=fs.model.decode)
    np.testing.assert_allclose(fs.decode(params, fs.encode(params, x)), raw, atol=1e-5)
    assert float(logvar.min()) >= -30 and float(logvar.max()) <= 20
    # Posterior samples spread around the mode by exp(logvar / 2).
    zs = ae.posterior_sample(mean, logvar, jax.random.PRNGKey(1))
    assert zs.shape == mean.shape and not np.allclose(zs, mean)
    # Frozen: no gradient flows into the VAE's params through encode.
    grads = jax.grad(lambda p: jnp.sum(fs.encode(p, x)))(params)
    assert all(float(jnp.abs(g).max()) == 0.0 for g in jax.tree.leaves(grads))


def test_a_missing_vae_checkpoint_is_an_error_naming_the_field_and_the_fix():
    fs = AutoencoderFirstStage(ae.preset("sd"), checkpoint="/nonexistent/vae")
    with pytest.raises(FileNotFoundError, match=r"(?s)first_stage.checkpoint: '/nonexistent/vae' does "
                       r"not exist.*python -m fmboost_jax.convert vae --src FILE --dst DIR"):
        fs.init_params(None)


def test_micro_batches_code_each_image_as_the_whole_batch_does():
    cfg = ae.preset("sd", ch=32, ch_mult=(1, 1, 1, 1), num_res_blocks=1)
    whole = AutoencoderFirstStage(cfg, checkpoint="random")
    params = whole.init_params(jax.random.PRNGKey(0))
    p = photo(32)[0]
    x = jnp.asarray(np.stack([p, p[::-1], p[:, ::-1]]))
    z = jax.jit(whole.encode)(params, x)   # jitted as in training: one program, not op by op
    decoded = jax.jit(whole.decode)(params, z)
    for k in (1, 2):                      # 2: three images in micro-batches of 2 and 1
        parts = AutoencoderFirstStage(cfg, checkpoint="random", micro_batch=k)
        np.testing.assert_allclose(jax.jit(parts.encode)(params, x), z, atol=1e-5)
        np.testing.assert_allclose(jax.jit(parts.decode)(params, z), decoded, atol=1e-4)
