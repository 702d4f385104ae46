"""Tests of fmboost_jax/inference/upsampler.py: loading a trained workdir and boosting images of
any size the network takes."""

import jax
import numpy as np
import pytest

from fmboost_jax.data import photos
from fmboost_jax.inference.upsampler import Cascade, largest_output, load_upsampler


def test_a_workdir_loads_with_its_config_and_boosts_any_size(tiny_workdir):
    """The boost is the sampler run with the run's EMA params (not the online ones, not fresh
    ones), at any input size the network takes."""
    from fmboost_jax.cfm.sampling import make_sample_fn
    from fmboost_jax.checkpoints.store import read_weights
    up = load_upsampler(tiny_workdir)
    assert up.upscale == 4 and up.config.high_res_size == 16
    weights, _ = read_weights(tiny_workdir)
    sample = make_sample_fn(up.cfm, solver="euler", num_steps=2)
    for shape in ((2, 4, 4, 3), (1, 6, 10, 3)):
        x = jax.random.uniform(jax.random.PRNGKey(0), shape, minval=-1, maxval=1)
        rng = jax.random.PRNGKey(1)
        out = up(x, rng, solver="euler", num_steps=2)
        assert out.images.shape == (shape[0], 4 * shape[1], 4 * shape[2], 3)
        assert int(out.stats["nfe"]) == 2
        got = {k: np.asarray(sample(weights[k], {}, x, rng).images)
               for k in ("ema_params", "params")}
        np.testing.assert_allclose(out.images, got["ema_params"], atol=1e-6)
        fresh = np.asarray(sample(up.cfm.init_params(jax.random.PRNGKey(0)), {}, x, rng).images)
        assert np.abs(got["ema_params"] - fresh).max() > 1e-4        # the params matter
        assert np.abs(got["ema_params"] - got["params"]).max() > 1e-6


def test_a_smaller_last_batch_is_padded_and_reuses_the_compiled_boost(tiny_workdir):
    up = load_upsampler(tiny_workdir)
    up.batch_size = 4
    x = photos.eval_crops(("coffee",), 8, 4)
    rng = jax.random.PRNGKey(2)
    four = up(x, rng, solver="euler", num_steps=2)
    three = up(x[:3], rng, solver="euler", num_steps=2)
    assert len(up._compiled) == 1 and three.images.shape[0] == 3
    np.testing.assert_allclose(three.images, np.asarray(four.images)[:3], atol=1e-6)


def test_the_same_options_and_shape_compile_once(tiny_workdir):
    up = load_upsampler(tiny_workdir)
    x = photos.eval_crops(("coffee",), 8, 2)
    a = up(x, solver="euler", num_steps=3)
    b = up(x + 0.01, solver="euler", num_steps=3)
    assert len(up._compiled) == 1 and not np.array_equal(a.images, b.images)
    up(x, solver="heun", num_steps=3)
    assert len(up._compiled) == 2


def test_a_boost_too_large_for_the_memory_is_refused_before_it_runs_naming_what_fits(tiny_workdir):
    from fmboost_jax.inference import memory
    up = load_upsampler(tiny_workdir)
    x = photos.eval_crops(("coffee",), 8, 16)
    up(x[:4], solver="euler", num_steps=1)
    four = memory.required_bytes(next(iter(up._compiled.values())))
    up.memory_limit = int(2 * four / memory.HEADROOM)          # room for about 8 images
    with pytest.raises(memory.TooLarge, match=r"needs about .* MiB per device .*\(16 images.*; "
                                              r"a batch of at most [5-9] fits"):
        up(x, solver="euler", num_steps=1)
    assert len(up._compiled) == 1                               # the refused program is dropped
    up.memory_limit = None                                      # what this machine has
    assert up(x, solver="euler", num_steps=1).images.shape == (16, 32, 32, 3)


def test_bad_models_and_inputs_are_named(tiny_workdir, tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_upsampler(str(tmp_path / "nowhere"))
    with pytest.raises(ValueError, match="not a training workdir"):
        load_upsampler(str(tmp_path))
    up = load_upsampler(tiny_workdir)
    with pytest.raises(ValueError, match=r"\(B, h, w, 3\)"):
        up(np.zeros((4, 4, 3)))
    x = np.zeros((1, 4, 4, 3))
    with pytest.raises(ValueError, match="config.coupling.noising_step"):   # no noise: no SDE
        up(x, solver="euler_maruyama")
    with pytest.raises(ValueError, match="config.sampling.guidance_scale"):  # no dropout
        up(x, guidance_scale=3.0)
    with pytest.raises(ValueError, match="unknown sampler option.*num_stpes"):
        up(x, num_stpes=3)


@pytest.fixture(scope="module")
def smoke(smoke_params):
    return load_upsampler(smoke_params, config="lhq:smoke")      # 2x in a tiny VAE's latent space


def test_from_latents_boosts_a_diffusion_models_latents_as_psu_does_its_image(smoke):
    fs, fs_params = smoke.cfm.first_stage, smoke.fs_params
    image = photos.eval_crops(("chelsea",), 16, 2)                  # 16² px
    z = fs.encode(fs_params, image)                                  # (2, 2, 2, 4) scaled latents
    rng = jax.random.PRNGKey(3)
    out = smoke.from_latents(z, rng, solver="euler", num_steps=1)
    assert out.latents.shape == (2, 4, 4, 4) and out.images.shape == (2, 32, 32, 3)
    via_images = smoke(fs.decode(fs_params, z), rng, solver="euler", num_steps=1)
    np.testing.assert_allclose(out.latents, via_images.latents, atol=1e-5)
    assert smoke.from_latents(z, rng, decode=False, solver="euler", num_steps=1).images is None
    with pytest.raises(ValueError, match=r"latents must be \(B, h, w, 4\).*\(2, 2, 2, 16\)"):
        smoke.from_latents(np.zeros((2, 2, 2, 16)))


def test_a_cascade_runs_its_stages_back_to_back_in_latent_space(smoke, tiny_workdir):
    cascade = Cascade([smoke, smoke])                                # 2x then 2x: 16² -> 64² px
    assert cascade.upscale == 4
    image = photos.eval_crops(("chelsea",), 16, 1)
    rng = jax.random.PRNGKey(5)
    first, second = cascade(image, rng, solver="euler", num_steps=1)
    assert first.images.shape == (1, 32, 32, 3) and second.images.shape == (1, 64, 64, 3)
    alone = smoke.from_latents(first.latents, jax.random.fold_in(rng, 1), solver="euler",
                               num_steps=1)
    np.testing.assert_allclose(second.latents, alone.latents, atol=1e-5)
    z = smoke.cfm.first_stage.encode(smoke.fs_params, image)
    outs = cascade.from_latents(z, rng, decode_all=False, solver="euler", num_steps=1)
    assert outs[0].images is None and outs[1].images.shape == (1, 64, 64, 3)
    with pytest.raises(ValueError, match="another latent space"):
        Cascade([smoke, load_upsampler(tiny_workdir)])               # pixels after latents


def test_ground_truth_is_fitted_to_the_largest_output_and_down_sampled_by_the_whole_factor(smoke):
    # One 2x stage makes multiples of 8 px (tiny VAE 8 x UNet 1); a second 2x stage then needs
    # inputs of 4-px multiples, so the cascade makes multiples of 16.
    cascade = Cascade([smoke, smoke])
    assert largest_output(smoke, 100, 40) == (96, 40)
    assert largest_output(cascade, 100, 40) == (96, 32)
    assert largest_output(cascade, 15, 100) == (0, 96)
    truth = photos.eval_crops(("chelsea",), 64, 1)
    assert smoke.downsample(truth).shape == (1, 32, 32, 3)
    low = cascade.downsample(truth)
    assert low.shape == (1, 16, 16, 3)
    # bilinear without anti-aliasing (torch's, as in training) by 4 in one step: the mean of the
    # two middle pixels of every 4 along each axis
    t = truth[0]
    middle = (t[1::4, 1::4] + t[1::4, 2::4] + t[2::4, 1::4] + t[2::4, 2::4]) / 4
    np.testing.assert_allclose(low[0], middle, atol=1e-5)


def rounding_bound(nfe: int, scale: float) -> float:
    """How far two float32 runs of the same sampler may differ when only the order of the
    sums differs (one row per device against the batch on one device: other convolution
    blockings): each network evaluation adds the rounding of its ~2^4 layers' reductions of
    up to 2^3 terms at the output's scale, and an ODE step carries it on; with NFE evaluations
    that is NFE * 2^7 units of float32's eps at `scale`. A sharding error (another row's noise,
    a missing row) is of the order of the images themselves."""
    return nfe * 2**7 * float(np.finfo(np.float32).eps) * max(scale, 1.0)


def test_a_batch_is_split_over_the_local_devices_with_the_single_device_result():
    import os
    import subprocess
    import sys

    from support import ROOT, devices_env
    script = os.path.join(ROOT, "tests", "inference", "split_over_devices.py")
    proc = subprocess.run([sys.executable, script], capture_output=True, text=True, timeout=300,
                          env=devices_env(8))
    assert proc.returncode == 0, proc.stderr[-3000:]
    row = next(r for r in proc.stdout.splitlines() if r.startswith("RESULT")).split()
    devices, used, padded = int(row[1]), int(row[2]), int(row[3])
    assert (devices, used, padded) == (8, 8, 8)
    assert float(row[4]) <= rounding_bound(int(row[5]), float(row[6]))
    row = next(r for r in proc.stdout.splitlines() if r.startswith("SDE")).split()
    assert int(row[1]) == 8                                  # sharded SDE sample, same noise
    assert float(row[2]) <= rounding_bound(int(row[3]), float(row[4]))
    row = next(r for r in proc.stdout.splitlines() if r.startswith("EVALUATOR")).split()
    # 5 held-out images on 8 devices: one row each (padded), not all 5 on every device
    assert (int(row[1]), int(row[2]), int(row[3])) == (1, 5, 5) and float(row[4]) <= 1e-4
    row = next(r for r in proc.stdout.splitlines() if r.startswith("INCEPTION")).split()
    assert (int(row[1]), int(row[2])) == (8, 8) and float(row[3]) <= 1e-5   # sharded features


def test_large_outputs_code_through_the_vae_tiles_close_to_whole_image_coding(smoke_params, smoke):
    """2048² and 4096² outputs take this path: the first stage's `tile_size` (lhq_2k: 1024) codes
    larger images in blended tiles. With a random tiny VAE on 48-px tiles (2x2 over 64 px) the
    tiled boost is measured at 0.19 of the output's norm from the whole one; misplaced or
    unblended tiles give errors of order 1."""
    from fmboost_jax.config import load_config
    config = load_config("lhq:smoke")
    config.first_stage.update(tile_size=48, tile_overlap=16)
    tiled = load_upsampler(smoke_params, config=config)
    image = photos.eval_crops(("chelsea",), 32, 1)
    rng = jax.random.PRNGKey(3)
    a = np.asarray(tiled(image, rng, solver="euler", num_steps=1).images)
    b = np.asarray(smoke(image, rng, solver="euler", num_steps=1).images)
    assert a.shape == b.shape == (1, 64, 64, 3)
    assert 0 < np.linalg.norm(a - b) / np.linalg.norm(b) < 0.3
