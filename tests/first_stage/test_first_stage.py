"""Tests of fmboost_jax/first_stage/__init__.py: the first stage of a config and its rules."""

import pytest
from support import config, tiny_pixel_config

from fmboost_jax.errors import ConfigError
from fmboost_jax.first_stage import (
    AutoencoderFirstStage,
    IdentityFirstStage,
    check_config,
    downsample_factor,
    first_stage_from_config,
    latent_channels,
)


def test_pixels_and_vaes_come_from_the_config_with_their_factor_and_channels():
    pixels = tiny_pixel_config()
    assert isinstance(first_stage_from_config(pixels), IdentityFirstStage)
    assert (downsample_factor(pixels), latent_channels(pixels)) == (1, 3)
    vae = config("lhq:smoke")
    fs = first_stage_from_config(vae)
    assert isinstance(fs, AutoencoderFirstStage) and fs.scale_factor == 0.18215
    assert (downsample_factor(vae), latent_channels(vae)) == (8, 4) == \
        (fs.downsample_factor, fs.latent_channels)
    vae.first_stage.name = "flux_vae"
    assert latent_channels(vae) == 16


@pytest.mark.parametrize("field,value,named", [
    ("tile_size", 100, "first_stage.tile_size"),       # not a multiple of 8
    ("tile_overlap", 512, "first_stage.tile_size"),    # overlap >= tile
    ("checkpoint", "", "first_stage.checkpoint"),
])
def test_bad_first_stage_fields_are_named(field, value, named):
    c = config("lhq:smoke")
    c.first_stage.tile_size = 512
    c.first_stage[field] = value
    with pytest.raises(ConfigError, match=named.replace(".", r"\.")):
        check_config(c)


def test_a_high_res_size_the_vae_cannot_take_is_named():
    c = config("lhq:smoke")
    c.high_res_size = 60
    with pytest.raises(ConfigError, match=r"config\.high_res_size: 60 is not divisible by .* 8"):
        check_config(c)
