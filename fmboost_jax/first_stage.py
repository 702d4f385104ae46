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

import os
from typing import Any, Protocol

import jax
import jax.numpy as jnp

from fmboost_jax import tiling
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

    def __init__(self, channels: int = 3):
        self.latent_channels = channels

    def init_params(self, rng: jax.Array) -> PyTree:
        del rng
        return {}

    def encode(self, params: PyTree, images: Array) -> Array:
        del params
        return images

    def decode(self, params: PyTree, latents: Array) -> Array:
        del params
        return latents


class AutoencoderFirstStage:
    """A frozen KL autoencoder (SD, SDXL, SD3, FLUX VAE): latents `(mode - shift) * scale`.

    Params come from an Orbax directory written by `python -m fmboost_jax.convert vae`, or are
    initialised at random when `random_init` (tests and smoke runs). Inputs larger than
    `tile_size` pixels (0: never) are encoded and decoded in overlapping blended tiles.
    """

    def __init__(self, config: autoencoder.AutoencoderConfig, checkpoint: str = "",
                 random_init: bool = False, dtype: Any = jnp.float32, tile_size: int = 0,
                 tile_overlap: int = 64):
        self.config = config
        self.model = autoencoder.AutoencoderKL(config, dtype)
        self.checkpoint, self.random_init = checkpoint, random_init
        self.scale_factor, self.shift_factor = config.scale_factor, config.shift_factor
        self.downsample_factor = config.downsample_factor
        self.latent_channels = config.z_channels
        self.tile_size, self.tile_overlap = tile_size, tile_overlap

    def init_params(self, rng: jax.Array) -> PyTree:
        if self.checkpoint:
            return load_autoencoder_params(self.checkpoint, self.model)
        if not self.random_init:
            raise ValueError(missing_checkpoint_message(""))
        return autoencoder.init_params(self.model, rng)

    def _tiled(self, fn, x: Array, scale: float, channels: int, tile: int, overlap: int) -> Array:
        if self.tile_size <= 0:
            return fn(x)
        return tiling.tiled_apply(fn, x, tile, overlap, scale, channels)

    def moments(self, params: PyTree, images: Array) -> tuple[Array, Array]:
        """Images (B, H, W, 3) in [-1, 1] -> unscaled posterior (mean, logvar), (B, H/8, W/8, C)."""
        enc = lambda x: jnp.concatenate(
            self.model.apply({"params": params}, x, method=self.model.encode), axis=-1)
        f = self.downsample_factor
        both = self._tiled(enc, images, 1 / f, 2 * self.latent_channels, self.tile_size,
                           self.tile_overlap)
        return tuple(jnp.split(both, 2, axis=-1))

    def encode(self, params: PyTree, images: Array) -> Array:
        """Images -> scaled latents `(mode - shift) * scale`, no gradient."""
        mean, _ = self.moments(jax.lax.stop_gradient(params), images)
        return jax.lax.stop_gradient((mean - self.shift_factor) * self.scale_factor)

    def decode(self, params: PyTree, latents: Array) -> Array:
        """Scaled latents (B, h, w, C) -> images (B, 8h, 8w, 3) in about [-1, 1]."""
        z = latents / self.scale_factor + self.shift_factor
        dec = lambda z: self.model.apply({"params": params}, z, method=self.model.decode)
        f = self.downsample_factor
        return self._tiled(dec, z, f, self.config.out_channels, self.tile_size // f,
                           self.tile_overlap // f)


def missing_checkpoint_message(path: str) -> str:
    where = f"{path!r} does not exist" if path else "is empty"
    return (f"config.first_stage.checkpoint {where}: the VAE's weights are needed. Convert a "
            "PyTorch checkpoint (the SD VAE `sd_ae.ckpt` of latent diffusion, or diffusers' "
            "`vae/diffusion_pytorch_model.safetensors`) with\n"
            "    python -m fmboost_jax.convert vae --src FILE --dst DIR [--preset sd|sdxl|sd3|flux]\n"
            "and pass --config.first_stage.checkpoint=DIR (or set it in the config).")


def load_autoencoder_params(path: str, model: autoencoder.AutoencoderKL) -> PyTree:
    """Params of `model` from an Orbax directory written by `convert vae`."""
    import orbax.checkpoint as ocp
    from etils import epath
    path = os.path.expanduser(path)
    if not epath.Path(path).exists():
        raise FileNotFoundError(missing_checkpoint_message(path))
    target = autoencoder.param_shapes(model)
    try:
        return ocp.StandardCheckpointer().restore(os.path.abspath(path) if "://" not in path
                                                  else path, target)
    except Exception as err:
        raise ValueError(f"config.first_stage.checkpoint={path!r} does not hold the params of a "
                         f"{model.config.z_channels}-channel VAE with ch={model.config.ch}, "
                         f"ch_mult={model.config.ch_mult}: {type(err).__name__}: "
                         f"{str(err).strip()[:500]}") from err


# config.first_stage.name -> autoencoder preset
VAE_PRESETS = {"sd_vae": "sd", "sdxl_vae": "sdxl", "sd3_vae": "sd3", "flux_vae": "flux"}
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def autoencoder_config(fs: Any) -> autoencoder.AutoencoderConfig:
    """The VAE of `config.first_stage` (its preset with the `ch`/`ch_mult`/... overrides)."""
    overrides = {k: (tuple(fs[k]) if k == "ch_mult" else fs[k])
                 for k in ("ch", "ch_mult", "num_res_blocks") if fs.get(k)}
    return autoencoder.preset(VAE_PRESETS[fs.name], **overrides)


def first_stage_from_config(config: Any) -> FirstStage:
    """Builds the first stage named by `config.first_stage.name`."""
    fs = config.first_stage
    name = fs.name
    if name == "identity":
        if config.scale_factor != 1.0:
            raise ValueError("config.scale_factor must be 1.0 with first_stage.name='identity' "
                             f"(got {config.scale_factor})")
        return IdentityFirstStage(fs.get("channels", 3))
    if name in VAE_PRESETS:
        return AutoencoderFirstStage(autoencoder_config(fs), checkpoint=fs.checkpoint,
                                     random_init=fs.random_init, dtype=DTYPES[fs.dtype],
                                     tile_size=fs.tile_size, tile_overlap=fs.tile_overlap)
    raise ValueError(f"config.first_stage.name: unknown first stage {name!r} "
                     f"(known: 'identity', {', '.join(map(repr, VAE_PRESETS))})")
