"""CFM in the VAE's latent space (PSU) through the trainer: the paper's configs, precomputed
latents, and the start-up check for a missing VAE checkpoint."""

import importlib.util
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fmboost_jax import config as config_lib
from fmboost_jax.cfm import CFM
from fmboost_jax.data import photos
from fmboost_jax.first_stage import AutoencoderFirstStage
from fmboost_jax.trainer import train_and_evaluate

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load(name: str, arg: str | None = None):
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "configs", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg) if arg else module.get_config()


def test_the_paper_configs_have_the_released_setup():
    for name, low, latent_low in (("lhq", 512, 64), ("faceshq", 256, 32)):
        c = load(name)
        assert (c.low_res_size, c.high_res_size) == (low, 1024)
        assert (c.low_res_size // 8, c.high_res_size // 8) == (latent_low, 128)
        assert c.first_stage.name == "sd_vae" and c.scale_factor == 0.18215
        assert c.coupling.upsampling_mode == "psu" and c.coupling.noising_step == 400
        assert c.coupling.concat_context and c.unet.in_channels == 8
        assert c.unet.channel_mult == (1, 2, 4, 8) and c.unet.num_res_blocks == 3
        assert c.optim.lr == 3e-5 and c.optim.warmup_steps == 1000 and c.ema.rate == 0.999
        assert c.dtype == "bfloat16"
        config_lib.validate(load(name, "smoke"))


def test_training_without_the_vae_checkpoint_fails_at_once_saying_how_to_make_it(tmp_path):
    workdir = tmp_path / "lhq"
    proc = subprocess.run([sys.executable, "-m", "fmboost_jax.train", "--config=configs/lhq.py",
                           f"--workdir={workdir}", "--config.first_stage.checkpoint=/no/vae"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert "config.first_stage.checkpoint: '/no/vae' does not exist" in proc.stderr
    assert "python -m fmboost_jax.convert vae --src FILE --dst DIR" in proc.stderr
    assert not workdir.exists()                       # nothing written before the check


def test_precomputed_latents_give_the_pairs_encoding_on_the_fly_gives():
    c = load("lhq", "smoke")
    c.coupling.noising_step = -1        # compare the deterministic parts
    cfm = CFM.from_config(c)
    fs = cfm.first_stage
    assert isinstance(fs, AutoencoderFirstStage)
    fs_params = fs.init_params(jax.random.PRNGKey(0))
    images = jnp.asarray(photos.PhotoCrops(("astronaut",), 64, 2, 0).batch(0)["image"])
    psu = cfm.coupling.upsample("psu", None, 8, cfm.lowres_images(images), 64, fs, fs_params, None)
    stored = {"image": images,
              "latent": fs.moments(fs_params, images)[0],                       # unscaled
              "latent_lowres": psu / fs.scale_factor + fs.shift_factor}          # unscaled
    rng = jax.random.PRNGKey(1)
    x0, x1, ctx = cfm.prepare(fs_params, {"image": images}, rng)
    y0, y1, yctx = cfm.prepare(fs_params, stored, rng)
    for a, b in ((x0, y0), (x1, y1), (ctx, yctx)):
        np.testing.assert_allclose(a, b, atol=1e-5)
    assert x1.shape == (2, 8, 8, 4)


@pytest.mark.slow
def test_the_lhq_config_trains_in_latent_space_and_samples(tmp_path):
    c = load("lhq", "smoke")
    final = train_and_evaluate(c, str(tmp_path))
    assert final["step"] == 3 and final["eval_size"] == 64
    for key in ("cfm/psnr", "cfm/ssim", "bilinear/psnr", "bicubic/psnr"):
        assert np.isfinite(final[key]), key
    assert final["nfe"] == 2
    rows = [json.loads(l) for l in open(tmp_path / "metrics.jsonl")]
    losses = [r["loss"] for r in rows if "loss" in r]
    assert len(losses) == 3 and all(np.isfinite(losses))
    assert os.listdir(tmp_path / "samples")
