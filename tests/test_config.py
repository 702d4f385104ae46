"""Tests of fmboost_jax/config.py: bad configs fail early, naming the field."""

import os

import pytest

from fmboost_jax import config as config_lib
from fmboost_jax.trainer import train_and_evaluate


def _assert_invalid(cfg, field):
    with pytest.raises(ValueError, match=field.replace(".", r"\.")):
        config_lib.validate(cfg)


def test_the_shipped_configs_are_valid(tiny_config):
    import importlib.util
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    spec = importlib.util.spec_from_file_location("demo", os.path.join(root, "configs", "demo.py"))
    demo = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(demo)
    config_lib.validate(demo.get_config())
    config_lib.validate(demo.get_config("smoke"))
    config_lib.validate(tiny_config)


def test_a_vae_first_stage_checks_its_scale_shift_and_checkpoint(tiny_config):
    c = tiny_config
    c.first_stage.update(name="sd3_vae", random_init=True)
    c.unet.update(in_channels=32, out_channels=16)
    c.low_res_size, c.high_res_size = 16, 64
    _assert_invalid(c, "config.scale_factor")                   # still the pixel-space 1.0
    c.scale_factor, c.shift_factor = 1.5305, 0.0609
    config_lib.validate(c)
    c.first_stage.random_init = False
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
    config_lib.validate(tiny_config)


@pytest.mark.parametrize("field,value,named", [
    ("coupling.upsampling_mode", "bicubic", "config.coupling.upsampling_mode"),
    ("sampling.solver", "rk45", "config.sampling.solver"),
    ("flow.schedule", "cosine", "config.flow.schedule"),
    ("dtype", "float16", "config.dtype"),
    ("unet.model_channels", 48, "config.unet.model_channels"),
    ("batch_size", 0, "config.batch_size"),
    ("mesh", (("data", 3), ("fsdp", 1)), "config.mesh"),
    ("first_stage.name", "vqgan", "config.first_stage.name"),
    ("scale_factor", 0.5, "config.scale_factor"),
    ("data.name", "webdataset", "config.data.name"),
    ("data.latent_sample", "mean", "config.data.latent_sample"),
    ("keep_every", -1, "config.keep_every"),
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
    with pytest.raises(ValueError, match="config.low_res_size"):
        train_and_evaluate(tiny_config, str(tmp_path / "run"))
    assert not (tmp_path / "run").exists()


def test_the_command_line_reports_a_bad_override_by_field(tmp_path):
    import subprocess
    import sys
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run(
        [sys.executable, "-m", "fmboost_jax.train", "--config=configs/demo.py",
         "--config.low_res_size=5", f"--workdir={tmp_path / 'run'}"],
        cwd=root, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert "config.low_res_size: 5 does not divide high_res_size 32" in proc.stderr
    assert not (tmp_path / "run").exists()


def test_the_local_launcher_explains_its_usage():
    import subprocess
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run(["bash", os.path.join(root, "launch", "run_local.sh")],
                          capture_output=True, text=True)
    assert proc.returncode == 2 and "usage:" in proc.stderr
