"""The coupling: how the flow's source x0 and its context come from the low-res input.

Follows the reference trainer (`get_source_and_context`, `upsample_latent`):
the low-res latent is brought to the high-res latent size by one of

- `psu`: pixel-space up-sampling; the low-res *image* is bilinearly up-sampled to
  the high-res image size and encoded (identical to `bilinear` in pixel space);
- `bilinear` / `nearest`: interpolation of the latent itself;
- `noise_upsampling`: nearest, with every new cell replaced by N(0, 1) noise;
- `identity`: the latent as it is (already at high-res size).

The source is that up-sampled latent (or N(0, I) with `start_from_noise`), optionally
noised with the forward diffusion at `noising_step`; the context, concatenated to the
UNet input, is the clean up-sampled latent. All arrays are NHWC.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from fmboost_jax import noising
from fmboost_jax.first_stage import FirstStage

Array = jax.Array
UPSAMPLING_MODES = ("psu", "bilinear", "nearest", "noise_upsampling", "identity")


def resize(images: Array, size: tuple[int, int], method: str = "bilinear",
           antialias: bool = True) -> Array:
    """Resizes (B, H, W, C) to (B, *size, C); half-pixel centres like PyTorch's align_corners=False."""
    b, _, _, c = images.shape
    return jax.image.resize(images, (b, *size, c), method=method, antialias=antialias)


def noise_upsample(z: Array, size: int, rng: jax.Array) -> Array:
    """Nearest up-sampling by an integer factor, new cells filled with N(0, 1) noise."""
    h, w = z.shape[1:3]
    if h != w:
        raise ValueError(f"noise_upsampling needs square latents, got {h}x{w}")
    if size <= h:
        return resize(z, (size, size), "nearest")
    if size % h:
        raise ValueError(f"noise_upsampling: size {size} is not a multiple of {h}")
    s = size // h
    up = resize(z, (size, size), "nearest")
    mask = jnp.zeros((1, size, size, 1), z.dtype).at[:, ::s, ::s, :].set(1)
    return mask * up + (1 - mask) * jax.random.normal(rng, up.shape, z.dtype)


@dataclasses.dataclass(frozen=True)
class Coupling:
    """Config of the coupling; field names are the reference's."""
    upsampling_mode: str = "psu"
    upsampling_mode_context: str | None = None   # None: same as upsampling_mode
    start_from_noise: bool = False
    noising_step: int = -1                       # <= 0 disables the forward noising
    concat_context: bool = True
    num_timesteps: int = 1000

    def __post_init__(self):
        for field in ("upsampling_mode", "upsampling_mode_context"):
            mode = getattr(self, field)
            if mode is not None and mode not in UPSAMPLING_MODES:
                raise ValueError(f"coupling.{field} must be one of {UPSAMPLING_MODES}, got {mode!r}")
        if self.start_from_noise and self.noising_step > 0:
            raise ValueError("coupling.noising_step > 0 cannot be combined with coupling.start_from_noise")
        if self.noising_step >= self.num_timesteps:
            raise ValueError(f"coupling.noising_step must be < {self.num_timesteps}, got {self.noising_step}")

    @property
    def uses_context(self) -> bool:
        return self.concat_context or self.start_from_noise

    def upsample(self, mode: str, lowres_z: Array, z_size: int, lowres_images: Array | None,
                 image_size: int, first_stage: FirstStage, fs_params: Any,
                 rng: jax.Array) -> Array:
        """Low-res latent (B, h, w, C) -> (B, z_size, z_size, C) by `mode`."""
        if mode == "identity":
            return lowres_z
        if mode == "psu":
            if lowres_z is not None and lowres_z.shape[1] == z_size:
                return lowres_z  # precomputed PSU latent
            if lowres_images is None:
                lowres_images = first_stage.decode(fs_params, lowres_z)
            up = resize(lowres_images, (image_size, image_size), "bilinear")
            return first_stage.encode(fs_params, up)
        if mode == "noise_upsampling":
            return noise_upsample(lowres_z, z_size, rng)
        return resize(lowres_z, (z_size, z_size), mode, antialias=False)

    def source_and_context(self, lowres_z: Array | None, z_size: int,
                           lowres_images: Array | None, image_size: int,
                           first_stage: FirstStage, fs_params: Any,
                           rng: jax.Array) -> tuple[Array, Array | None]:
        """x0 (B, z, z, C) and the context (or None) for a batch of low-res inputs."""
        up_rng, ctx_rng, src_rng = jax.random.split(rng, 3)
        z_up = self.upsample(self.upsampling_mode, lowres_z, z_size, lowres_images, image_size,
                             first_stage, fs_params, up_rng)
        x0 = jax.random.normal(src_rng, z_up.shape, z_up.dtype) if self.start_from_noise else z_up
        if self.noising_step > 0:
            noise = jax.random.normal(jax.random.fold_in(src_rng, 1), z_up.shape, z_up.dtype)
            x0 = noising.q_sample(x0, self.noising_step, noise, self.num_timesteps)
        context = None
        if self.uses_context:
            mode_ctx = self.upsampling_mode_context or self.upsampling_mode
            context = z_up if mode_ctx == self.upsampling_mode else self.upsample(
                mode_ctx, lowres_z, z_size, lowres_images, image_size, first_stage, fs_params, ctx_rng)
        return x0, context
