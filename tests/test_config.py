"""Tests of fmboost_jax/config.py: the released defaults, the loader, and bad configs failing
early with the field named."""

import os
import subprocess
import sys

import pytest
from support import ROOT

from fmboost_jax import config as config_lib
from fmboost_jax.config import base_config, load_config
from fmboost_jax.errors import ConfigError
from fmboost_jax.models import autoencoder
from fmboost_jax.train.loop import train_and_evaluate
from fmboost_jax.train.setup import validate


def _assert_invalid(cfg, field):
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        validate(cfg)


def test_base_config_is_the_released_setup_field_by_field():
    c = base_config()
    assert (c.low_res_size, c.high_res_size) == (512, 1024)
    assert (c.lowres_downsampling, c.lowres_antialias) == ("bilinear", False)
    assert c.first_stage.name == "sd_vae" and c.first_stage.dtype == "auto"
    assert autoencoder.PRESETS["sd"].scale_factor == 0.18215
    assert dict(c.coupling) == dict(upsampling_mode="psu", upsampling_mode_context="",
                                    start_from_noise=False, noising_step=400,
                                    concat_context=True, num_timesteps=1000,
                                    context_dropout=0.0)
    assert dict(c.flow) == dict(schedule="linear", sigma_min=0.0)
    assert dict(c.unet) == dict(
        in_channels=8, model_channels=128, out_channels=4, num_res_blocks=3,
        attention_resolutions=(8, 16), dropout=0.0, channel_mult=(1, 2, 4, 8),
        conv_resample=True, dim_head=64, num_heads=4, use_linear_attn=False,
        use_scale_shift_norm=True, pool_factor=-1, attention="einsum", remat=False)
    assert (c.optim.lr, c.optim.warmup_steps, c.optim.weight_decay) == (3e-5, 1000, 0.0)
    assert not c.optim.warmup_from_zero
    assert (c.ema.rate, c.ema.update_after_step, c.ema.power, c.ema.before_update) == \
        (0.999, 1000, 0.75, True)
    assert (c.sampling.solver, c.sampling.num_steps) == ("rk4", 39)    # 40 time points
    assert (c.sampling.rtol, c.sampling.atol) == (1e-3, 1e-6)
    assert (c.sampling.diffusion_form, c.sampling.last_step, c.sampling.last_step_size) == (
        "sigma", "Mean", 0.04)                                         # FlowSDE.sample's
    assert c.sampling.guidance_scale == 1.0
    assert c.dtype == "auto" and config_lib.dtype("auto") == config_lib.DTYPES["float32"]


def test_the_shipped_configs_are_valid_and_load_by_name_or_path(tiny_config):
    for spec in ("demo", "demo:smoke", "lhq", "lhq:smoke", "faceshq", "faceshq:smoke", "lhq_2k",
                 "lhq_2k:smoke", "lhq_cascade", "lhq_cascade:smoke"):
        validate(load_config(spec))
    by_path = load_config(os.path.join(ROOT, "configs", "faceshq.py") + ":smoke")
    assert by_path == load_config("faceshq:smoke")
    validate(tiny_config)
    with pytest.raises(FileNotFoundError, match="no/such.py"):
        load_config("no/such.py")


def test_the_paper_configs_change_only_what_differs_from_the_released_setup():
    base, lhq, faces = base_config(), load_config("lhq"), load_config("faceshq")
    assert lhq.unet == base.unet and lhq.coupling == base.coupling and lhq.optim == base.optim
    assert (faces.low_res_size, faces.high_res_size) == (256, 1024)        # 32² -> 128² latents
    assert faces.data.tfds_name == "faceshq" and faces.unet == base.unet
    two_k, stage2 = load_config("lhq_2k"), load_config("lhq_cascade")
    assert (two_k.low_res_size // 8, two_k.high_res_size // 8) == (64, 256)    # the 2k figure
    assert (stage2.low_res_size, stage2.high_res_size) == (lhq.high_res_size, 2048)
    assert two_k.first_stage.tile_size == stage2.first_stage.tile_size == 1024


def test_a_vae_first_stage_needs_a_checkpoint(tiny_config):
    c = tiny_config
    c.first_stage.update(name="sd3_vae", checkpoint="random")
    c.unet.update(in_channels=32, out_channels=16)
    c.low_res_size, c.high_res_size = 16, 64
    validate(c)
    c.first_stage.checkpoint = ""
    _assert_invalid(c, "config.first_stage.checkpoint")         # empty: how to make one


def test_an_unknown_field_is_named(tiny_config):
    tiny_config.coupling.nosing_step = 400
    _assert_invalid(tiny_config, "config.coupling.nosing_step")


def test_low_res_size_must_divide_high_res_size(tiny_config):
    tiny_config.low_res_size = 5
    _assert_invalid(tiny_config, "config.low_res_size")


def test_unet_channels_must_match_the_first_stage(tiny_config):
    tiny_config.unet.in_channels = 8
    _assert_invalid(tiny_config, "config.unet.in_channels")
    tiny_config.unet.in_channels = 6
    tiny_config.unet.out_channels = 4
    _assert_invalid(tiny_config, "config.unet.out_channels")


def test_context_off_halves_the_expected_input_channels(tiny_config):
    tiny_config.coupling.concat_context = False
    _assert_invalid(tiny_config, "config.unet.in_channels")
    tiny_config.unet.in_channels = 3
    validate(tiny_config)


@pytest.mark.parametrize("field,value,named", [
    ("coupling.upsampling_mode", "bicubic", "config.coupling.upsampling_mode"),
    ("coupling.upsampling_mode_context", "area", "config.coupling.upsampling_mode_context"),
    ("sampling.solver", "rk45", "config.sampling.solver"),
    ("sampling.rtol", 0.0, "config.sampling.rtol"),
    ("sampling.num_points", 1, "config.sampling.num_points"),
    ("coupling.context_dropout", 1.0, "config.coupling.context_dropout"),
    ("flow.schedule", "cosine", "config.flow.schedule"),
    ("dtype", "float16", "config.dtype"),
    ("first_stage.dtype", "float16", "config.first_stage.dtype"),
    ("unet.model_channels", 48, "config.unet.model_channels"),
    ("batch_size", 0, "config.batch_size"),
    ("mesh", (("data", 0), ("fsdp", 1)), "config.mesh"),
    ("first_stage.name", "vqgan", "config.first_stage.name"),
    ("data.name", "webdataset", "config.data.name"),
    ("data.latent_sample", "mean", "config.data.latent_sample"),
    ("keep_every", -1, "config.keep_every"),
    ("ema.rate", 1.0, "config.ema.rate"),
    ("optim.lr", -1.0, "config.optim.lr"),
])
def test_invalid_values_are_named(tiny_config, field, value, named):
    obj = tiny_config
    *parents, leaf = field.split(".")
    for p in parents:
        obj = obj[p]
    obj[leaf] = value
    _assert_invalid(tiny_config, named)


def test_noising_with_start_from_noise_is_rejected(tiny_config):
    tiny_config.coupling.start_from_noise = True
    tiny_config.coupling.noising_step = 400
    _assert_invalid(tiny_config, "config.coupling.noising_step")



def test_the_trainer_rejects_a_bad_config_before_writing_anything(tiny_config, tmp_path):
    tiny_config.high_res_size = 18
    with pytest.raises(ConfigError, match="config.low_res_size"):
        train_and_evaluate(tiny_config, str(tmp_path / "run"))
    assert not (tmp_path / "run").exists()


def test_the_command_line_reports_a_bad_override_in_one_line_without_a_traceback(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "fmboost_jax.train", "--config=configs/demo.py",
         "--config.low_res_size=5", f"--workdir={tmp_path / 'run'}"],
        cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    assert "error: config.low_res_size: 5 does not divide high_res_size 32" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "run").exists()


CONFIG_FILES = {  # a config file -> what the one line must say
    "missing.py": "--config=missing.py cannot be loaded: [Errno 2] No such file or directory",
    "syntax.py": "syntax.py, line 1): SyntaxError: invalid syntax",
    "raises.py": "raises.py, line 2): KeyError: 'no such preset'",
    "nosuch:smoke": "--config=nosuch:smoke: no config named 'nosuch' in configs/",
}


@pytest.mark.parametrize("name", sorted(CONFIG_FILES))
def test_a_config_file_that_does_not_load_is_named_in_one_line(tmp_path, name):
    (tmp_path / "syntax.py").write_text("def get_config(:\n")
    (tmp_path / "raises.py").write_text("def get_config():\n    raise KeyError('no such preset')\n")
    cmd = [sys.executable, "-m", "fmboost_jax.train", f"--config={name}",
           f"--workdir={tmp_path / 'run'}"]
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith("error: ")
    assert CONFIG_FILES[name] in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "run").exists()
    debug = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=300,
                           env=dict(os.environ, FMBOOST_DEBUG="1"))
    assert "Traceback" in debug.stderr                 # the switch that shows it


def test_the_local_launcher_explains_its_usage():
    proc = subprocess.run(["bash", os.path.join(ROOT, "launch", "run_local.sh")],
                          capture_output=True, text=True)
    assert proc.returncode == 2 and "usage:" in proc.stderr


def test_the_local_launcher_does_not_restart_a_refused_run(tmp_path):
    """Status 2 is a refusal (here a bad field): restarting cannot help."""
    proc = subprocess.run(["bash", os.path.join(ROOT, "launch", "run_local.sh"), "demo:smoke",
                           str(tmp_path / "run"), "--config.low_res_size=5"],
                          capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, MAX_RESTARTS="3", PATH=os.pathsep.join(
                              [os.path.dirname(sys.executable), os.environ["PATH"]])))
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.count("error: config.low_res_size") == 1
    assert "not restarting" in proc.stderr and "resuming" not in proc.stderr


def test_an_sde_solver_needs_a_noised_source(tiny_config):
    """The demo's coupling (no noising): no score, so SDE solvers are refused, naming the field."""
    tiny_config.sampling.solver = "euler_maruyama"
    _assert_invalid(tiny_config, "config.coupling.noising_step")
    tiny_config.coupling.noising_step = 400
    validate(tiny_config)
    tiny_config.sampling.diffusion_form = "cosine"
    _assert_invalid(tiny_config, "config.sampling.diffusion_form")
    tiny_config.sampling.update(diffusion_form="SBDM", last_step="Tweedie")
    _assert_invalid(tiny_config, "config.sampling.last_step")
    tiny_config.sampling.update(last_step="Mean", last_step_size=1.0)
    _assert_invalid(tiny_config, "config.sampling.last_step_size")
    tiny_config.sampling.update(solver="sde_heun", last_step="none", last_step_size=0.04)
    _assert_invalid(tiny_config, "config.sampling.last_step")      # its drift at t = 1
    tiny_config.sampling.last_step = "Mean"
    tiny_config.coupling.update(upsampling_mode="noise_upsampling",
                                upsampling_mode_context="bilinear")
    _assert_invalid(tiny_config, "config.coupling.upsampling_mode_context")
    tiny_config.coupling.update(upsampling_mode="bilinear", concat_context=False)
    tiny_config.unet.in_channels = 3
    _assert_invalid(tiny_config, "config.coupling.concat_context")


def test_a_regression_model_takes_any_solver_setting(tiny_config):
    config_lib.as_regression(tiny_config)
    tiny_config.sampling.solver = "euler_maruyama"     # ignored: one pass
    validate(tiny_config)
    tiny_config.coupling.start_from_noise = True
    _assert_invalid(tiny_config, "config.coupling.start_from_noise")


def test_guidance_needs_a_model_trained_with_context_dropout(tiny_config):
    tiny_config.sampling.guidance_scale = 2.0
    _assert_invalid(tiny_config, "config.sampling.guidance_scale")
    tiny_config.coupling.context_dropout = 0.1
    validate(tiny_config)
    tiny_config.coupling.concat_context = False
    tiny_config.unet.in_channels = 3
    _assert_invalid(tiny_config, "config.coupling.context_dropout")


def test_a_run_config_written_before_a_field_existed_reads_with_its_default():
    c = config_lib.base_config()
    del c.coupling["context_dropout"]
    del c.sampling["guidance_scale"]
    filled = config_lib.with_defaults(c)
    assert filled.coupling.context_dropout == 0.0 and filled.sampling.guidance_scale == 1.0
    assert filled.coupling.noising_step == c.coupling.noising_step
