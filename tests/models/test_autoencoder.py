"""Tests of fmboost_jax/models/autoencoder.py: parity with diffusers' PyTorch AutoencoderKL on
a real photo, parameter counts, bfloat16, chunked attention."""


import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from vae_oracle import assert_parity, flax_outputs, photo  # noqa: E402

from fmboost_jax.first_stage import AutoencoderFirstStage  # noqa: E402
from fmboost_jax.models import autoencoder as ae  # noqa: E402
from fmboost_jax.models.layers import count_params  # noqa: E402


def test_sd_vae_has_the_sd_parameter_counts():
    shapes = ae.param_shapes(ae.AutoencoderKL(ae.preset("sd")))
    part = lambda *names: count_params({k: shapes[k] for k in names})
    assert part("encoder", "quant_conv") == 34_163_664
    assert part("decoder", "post_quant_conv") == 49_490_199


@pytest.mark.slow
def test_diffusers_weights_encode_and_decode_a_photo_like_pytorch(sd):
    _, x, theirs, params = sd
    ours = flax_outputs(ae.AutoencoderKL(ae.preset("sd")), params, x, theirs[0])
    assert_parity(ours, theirs, 1e-4)


def test_bfloat16_compute_keeps_float32_params_and_tracks_float32_outputs():
    cfg = ae.preset("sd", ch=32, ch_mult=(1, 2), num_res_blocks=1)
    f32 = AutoencoderFirstStage(cfg, checkpoint="random")
    b16 = AutoencoderFirstStage(cfg, checkpoint="random", dtype=jnp.bfloat16)
    params = b16.init_params(jax.random.PRNGKey(0))
    assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(params))
    x = jnp.asarray(photo(32))
    z32, z16 = jax.jit(f32.encode)(params, x), jax.jit(b16.encode)(params, x)
    assert z16.dtype == jnp.float32                      # moments come back in float32
    err = float(jnp.abs(z32 - z16).max()) / float(jnp.abs(z32).max())
    assert 0 < err < 0.05                                # bfloat16 rounding, no more
    d32, d16 = jax.jit(f32.decode)(params, z32), jax.jit(b16.decode)(params, z32)
    assert float(jnp.abs(d32 - d16).max()) / float(jnp.abs(d32).max()) < 0.05
    # The moments (the flow's targets and context) are computed in float32 by the layers next
    # to the latent, not rounded to bfloat16's 8-bit mantissa.
    mean, _ = jax.jit(b16.moments)(params, x)
    rounded = mean.astype(jnp.bfloat16).astype(jnp.float32)
    assert float(jnp.mean(mean != rounded)) > 0.9


def test_attention_in_query_chunks_equals_attention_over_all_queries():
    q, k, v = (jax.random.normal(jax.random.PRNGKey(i), (2, 1100, 16)) for i in range(3))
    np.testing.assert_allclose(ae.attention(q, k, v, query_chunk=256),
                               ae.attention(q, k, v, query_chunk=2048), atol=1e-6)
