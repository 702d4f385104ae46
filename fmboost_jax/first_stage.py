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
    initialised at random when `random_init` (tests and smoke runs).

    Inputs larger than `tile_size` pixels (0: never) are coded in overlapping, cross-faded tiles
    (`tiling.py`), in three steps that keep memory at one tile's activations plus the whole
    image's features at the latent resolution (64x fewer positions than pixels):
    the network's levels above the latent resolution run tile by tile; the rest (the deepest
    level, the attention block, the output layers) runs on the whole latent, so attention stays
    global as in whole-image coding; and with `tile_shared_stats` the tiles' GroupNorms share one
    estimate of the whole image's statistics, the mean over the tiles of their own (one extra
    pass over the tiles), instead of each tile normalising with its own as most tiled VAEs do.
    """

    def __init__(self, config: autoencoder.AutoencoderConfig, checkpoint: str = "",
                 random_init: bool = False, dtype: Any = jnp.float32, tile_size: int = 0,
                 tile_overlap: int = 64, tile_shared_stats: bool = True):
        self.config = config
        self.model = autoencoder.AutoencoderKL(config, dtype)
        self.checkpoint, self.random_init = checkpoint, random_init
        self.scale_factor, self.shift_factor = config.scale_factor, config.shift_factor
        self.downsample_factor = config.downsample_factor
        self.latent_channels = config.z_channels
        self.tile_size, self.tile_overlap = tile_size, tile_overlap
        self.tile_shared_stats = tile_shared_stats

    def init_params(self, rng: jax.Array) -> PyTree:
        if self.checkpoint:
            return load_autoencoder_params(self.checkpoint, self.model)
        if not self.random_init:
            raise ValueError(missing_checkpoint_message(""))
        return autoencoder.init_params(self.model, rng)

    def _apply(self, params: PyTree, x: Array, method: str, stats: PyTree | None = None) -> Any:
        variables = {"params": params}
        if stats is not None:
            variables[autoencoder.NORM_STATS] = stats
        return self.model.apply(variables, x, method=getattr(self.model, method))

    def _tiled_pixel_part(self, params: PyTree, x: Array, method: str, tile: int, overlap: int,
                          scale: float, out_channels: int) -> Array:
        """`method` (a pixel part) applied in tiles that share GroupNorm statistics."""
        align = max(1, round(1 / scale))
        stats = None
        if self.tile_shared_stats:
            def measure(window):
                _, out = self.model.apply({"params": params}, window,
                                          method=getattr(self.model, method),
                                          mutable=[autoencoder.MEASURED_NORM_STATS])
                return out[autoencoder.MEASURED_NORM_STATS]
            stats = tiling.tiled_mean(measure, x, tile, overlap, align)
        return tiling.tiled_apply(lambda w: self._apply(params, w, method, stats), x, tile,
                                  overlap, scale, out_channels)

    def _tiles(self, x: Array, tile: int) -> bool:
        return 0 < self.tile_size and (x.shape[1] > tile or x.shape[2] > tile)

    def moments(self, params: PyTree, images: Array) -> tuple[Array, Array]:
        """Images (B, H, W, 3) in [-1, 1] -> unscaled posterior (mean, logvar), (B, H/8, W/8, C)."""
        if not self._tiles(images, self.tile_size):
            return self._apply(params, images, "encode")
        cfg = self.config
        h = self._tiled_pixel_part(params, images, "encode_pixel_part", self.tile_size,
                                   self.tile_overlap, 1 / self.downsample_factor,
                                   cfg.ch * cfg.ch_mult[-2])
        return self._apply(params, h, "encode_latent_part")

    def encode(self, params: PyTree, images: Array) -> Array:
        """Images -> scaled latents `(mode - shift) * scale`, no gradient."""
        mean, _ = self.moments(jax.lax.stop_gradient(params), images)
        return jax.lax.stop_gradient((mean - self.shift_factor) * self.scale_factor)

    def decode(self, params: PyTree, latents: Array) -> Array:
        """Scaled latents (B, h, w, C) -> images (B, 8h, 8w, 3) in about [-1, 1]."""
        z = latents / self.scale_factor + self.shift_factor
        f = self.downsample_factor
        if not self._tiles(z, self.tile_size // f):
            return self._apply(params, z, "decode")
        h = self._apply(params, z, "decode_latent_part")
        return self._tiled_pixel_part(params, h, "decode_pixel_part", self.tile_size // f,
                                      self.tile_overlap // f, f, self.config.out_channels)


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
                                     tile_size=fs.tile_size, tile_overlap=fs.tile_overlap,
                                     tile_shared_stats=fs.tile_shared_stats)
    raise ValueError(f"config.first_stage.name: unknown first stage {name!r} "
                     f"(known: 'identity', {', '.join(map(repr, VAE_PRESETS))})")
