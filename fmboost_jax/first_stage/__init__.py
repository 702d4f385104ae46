"""The first stage: where the flow lives (pixels or an autoencoder's latent space).

`IdentityFirstStage` is pixel space; `AutoencoderFirstStage` the latent space of a frozen KL
VAE of the Stable Diffusion family (`models/autoencoder.py`), as in the paper.

A first stage maps images (B, H, W, 3) in [-1, 1] to the flow's space and back:
`encode(params, images) -> latents` (B, H/f, W/f, C) already multiplied by
`scale_factor`, and `decode(params, latents) -> images`. Parameters are an explicit
pytree so that they pass through `jax.jit` as arguments, never as baked-in
constants, and are never differentiated (the trainer stops gradients).
"""
from __future__ import annotations

from typing import Any, Protocol

import jax

from fmboost_jax import config as config_lib
from fmboost_jax import paths
from fmboost_jax.errors import ConfigError, check_one_of, check_range
from fmboost_jax.first_stage import tiling
from fmboost_jax.first_stage.vae import (
    RANDOM_WEIGHTS,
    AutoencoderFirstStage,
    missing_checkpoint_message,
)
from fmboost_jax.models import autoencoder

Array = jax.Array
PyTree = Any


class FirstStage(Protocol):
    """Interface every first stage implements."""
    scale_factor: float
    shift_factor: float      # latents are (z - shift) * scale
    downsample_factor: int   # pixels per latent cell along each spatial axis
    latent_channels: int

    def init_params(self, rng: jax.Array) -> PyTree: ...
    def encode(self, params: PyTree, images: Array) -> Array: ...
    def decode(self, params: PyTree, latents: Array) -> Array: ...


class IdentityFirstStage:
    """Pixel-space flow: encode and decode are the identity, scale factor 1."""
    scale_factor = 1.0
    shift_factor = 0.0
    downsample_factor = 1

    latent_channels = 3

    def init_params(self, rng: jax.Array) -> PyTree:
        del rng
        return {}

    def encode(self, params: PyTree, images: Array) -> Array:
        del params
        return images

    def decode(self, params: PyTree, latents: Array) -> Array:
        del params
        return latents

# config.first_stage.name -> autoencoder preset ("tiny_vae": a narrow SD-layout VAE for smoke runs)
VAE_PRESETS = {"sd_vae": "sd", "sdxl_vae": "sdxl", "sd3_vae": "sd3", "flux_vae": "flux",
               "tiny_vae": "tiny"}
NAMES = ("identity", *VAE_PRESETS)


def autoencoder_config(config: Any) -> autoencoder.AutoencoderConfig:
    """The VAE named by `config.first_stage.name`."""
    return autoencoder.PRESETS[VAE_PRESETS[config.first_stage.name]]


def latent_channels(config: Any) -> int:
    """Channels of the flow's space: 3 for pixels, the VAE's latent channels otherwise."""
    if config.first_stage.name == "identity":
        return IdentityFirstStage.latent_channels
    return autoencoder_config(config).z_channels


def downsample_factor(config: Any) -> int:
    """Pixels per cell of the flow's space along each axis."""
    if config.first_stage.name == "identity":
        return 1
    return autoencoder_config(config).downsample_factor


def first_stage_from_config(config: Any) -> FirstStage:
    """Builds the first stage named by `config.first_stage.name`."""
    fs = config.first_stage
    if fs.name == "identity":
        return IdentityFirstStage()
    tiles = (tiling.TileOptions(fs.tile_size, fs.tile_overlap, fs.tile_shared_stats)
             if fs.tile_size > 0 else None)
    return AutoencoderFirstStage(autoencoder_config(config), checkpoint=fs.checkpoint,
                                 dtype=config_lib.dtype(fs.dtype), tiling=tiles,
                                 micro_batch=fs.micro_batch)


def check_checkpoint(config: Any) -> None:
    """The VAE checkpoint of `config.first_stage` exists (local or on a bucket); ConfigError
    saying how to make one otherwise."""
    fs = config.first_stage
    if fs.name != "identity" and fs.checkpoint != RANDOM_WEIGHTS:
        if not paths.exists(fs.checkpoint):
            raise ConfigError("first_stage.checkpoint", missing_checkpoint_message(fs.checkpoint))


def check_config(config: Any) -> None:
    """The rules of `config.first_stage` and the sizes it must divide (no files read)."""
    fs = config.first_stage
    check_one_of(config, "first_stage.name", NAMES)
    check_one_of(config, "first_stage.dtype", config_lib.DTYPE_NAMES)
    check_range(config, "first_stage.micro_batch", 0)
    factor = downsample_factor(config)
    if fs.name != "identity":
        if not fs.checkpoint:
            raise ConfigError("first_stage.checkpoint", missing_checkpoint_message(""))
        if fs.tile_size and (fs.tile_size % factor or not 0 <= fs.tile_overlap < fs.tile_size):
            raise ConfigError("first_stage.tile_size", f"{fs.tile_size} must be a multiple of "
                              f"{factor} and larger than first_stage.tile_overlap="
                              f"{fs.tile_overlap}")
    if config.high_res_size % factor:
        raise ConfigError("high_res_size", f"{config.high_res_size} is not divisible by the "
                          f"first stage's factor {factor}")
    if config.coupling.upsampling_mode != "psu" and config.low_res_size % factor:
        raise ConfigError("low_res_size", f"{config.low_res_size} is not divisible by the first "
                          f"stage's factor {factor}, which upsampling mode "
                          f"{config.coupling.upsampling_mode!r} encodes the low-res image with")
