"""The first stage: where the flow lives (pixels or an autoencoder's latent space).

A first stage maps images (B, H, W, 3) in [-1, 1] to the flow's space and back:
`encode(params, images) -> latents` (B, H/f, W/f, C) already multiplied by
`scale_factor`, and `decode(params, latents) -> images`. Parameters are an explicit
pytree so that they pass through `jax.jit` as arguments, never as baked-in
constants, and are never differentiated (the trainer stops gradients).
"""

from __future__ import annotations

from typing import Any, Protocol

import jax

Array = jax.Array
PyTree = Any


class FirstStage(Protocol):
    """Interface every first stage implements."""
    scale_factor: float
    downsample_factor: int   # pixels per latent cell along each spatial axis
    latent_channels: int

    def init_params(self, rng: jax.Array) -> PyTree: ...
    def encode(self, params: PyTree, images: Array) -> Array: ...
    def decode(self, params: PyTree, latents: Array) -> Array: ...


class IdentityFirstStage:
    """Pixel-space flow: encode and decode are the identity, scale factor 1."""
    scale_factor = 1.0
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


def first_stage_from_config(config: Any) -> FirstStage:
    """Builds the first stage named by `config.first_stage.name`."""
    name = config.first_stage.name
    if name == "identity":
        if config.scale_factor != 1.0:
            raise ValueError("config.scale_factor must be 1.0 with first_stage.name='identity' "
                             f"(got {config.scale_factor})")
        return IdentityFirstStage(config.first_stage.get("channels", 3))
    raise ValueError(f"config.first_stage.name: unknown first stage {name!r} (known: 'identity')")
