"""Tests of fmboost_jax/train/setup.py: the start-up checks of files, devices and data."""

import pytest

from fmboost_jax.errors import ConfigError
from fmboost_jax.train.setup import check_resources, startup_checks, validate


def test_the_mesh_and_the_batch_must_fit_this_machines_devices(tiny_config):
    tiny_config.mesh = (("data", 3), ("fsdp", 1))       # valid as a value, not on 1 device
    validate(tiny_config)
    with pytest.raises(ConfigError, match=r"config\.mesh: .*needs 3 devices"):
        check_resources(tiny_config)


def test_a_vae_checkpoint_must_exist_and_random_weights_need_none(tiny_config, tmp_path):
    from support import config
    c = config("lhq:smoke")
    check_resources(c)                                   # checkpoint="random"
    c.first_stage.checkpoint = str(tmp_path / "vae")
    with pytest.raises(ConfigError, match=r"first_stage\.checkpoint: '.*vae' does not exist"):
        check_resources(c)


def test_data_that_cannot_be_read_stops_the_start_up(tiny_config, tmp_path):
    tiny_config.data.update(name="folder", path=str(tmp_path / "none"))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        startup_checks(tiny_config)
