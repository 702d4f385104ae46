"""The up-sampled latent: the low-res input brought to the high-res latent size.

Whatever a batch holds about the low-res input is said explicitly in a `LowRes`:

- `images`: low-res images (B, h, w, 3) in [-1, 1] (training from images, sampling);
- `latent`: a low-res latent (B, h/f, w/f, C), scaled as the first stage's `encode` returns it
  (e.g. what a diffusion model emits);
- `psu_latent`: a precomputed PSU latent, already at the high-res latent size (latent records).

`upsample(mode, lowres, size, first_stage, fs_params, rng)` makes the up-sampled latent by one of
the reference's modes (`upsample_latent`):

- `psu`: pixel-space up-sampling: the low-res *image* is bilinearly up-sampled to the high-res
  image size and encoded (in pixel space: bilinear up-sampling);
- `bilinear` / `nearest`: interpolation of the low-res latent itself;
- `noise_upsampling`: nearest, with every new cell replaced by N(0, 1) noise;
- `identity`: the low-res latent as it is (it must already have the high-res latent size).

A missing representation is made from another (images are encoded, latents decoded) when the
mode needs it. All arrays are NHWC.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from fmboost_jax.first_stage import FirstStage

Array = jax.Array
PyTree = Any
MODES = ("psu", "bilinear", "nearest", "noise_upsampling", "identity")


class LowRes(NamedTuple):
    """What is known of the low-res input; at least one field is set."""
    images: Array | None = None        # (B, h, w, 3) in [-1, 1]
    latent: Array | None = None        # (B, h/f, w/f, C), scaled
    psu_latent: Array | None = None    # (B, H/f, W/f, C), scaled: the PSU latent itself


def resize(images: Array, size: tuple[int, int], method: str = "bilinear",
           antialias: bool = True) -> Array:
    """Resizes (B, H, W, C) to (B, *size, C); half-pixel centres like PyTorch's align_corners=False."""
    b, _, _, c = images.shape
    return jax.image.resize(images, (b, *size, c), method=method, antialias=antialias)


def noise_upsample(z: Array, size: tuple[int, int], rng: jax.Array) -> Array:
    """Nearest up-sampling by integer factors, new cells filled with N(0, 1) noise."""
    h, w = z.shape[1:3]
    if size[0] % h or size[1] % w:
        raise ValueError(f"noise_upsampling: {size[0]}x{size[1]} is not a multiple of {h}x{w}")
    sh, sw = size[0] // h, size[1] // w
    up = resize(z, size, "nearest")
    mask = jnp.zeros((1, *size, 1), z.dtype).at[:, ::sh, ::sw, :].set(1)
    return mask * up + (1 - mask) * jax.random.normal(rng, up.shape, z.dtype)


def lowres_latent(lowres: LowRes, first_stage: FirstStage, fs_params: PyTree) -> Array:
    """The low-res latent: given, or the low-res images encoded."""
    if lowres.latent is not None:
        return lowres.latent
    if lowres.images is None:
        raise ValueError("this up-sampling mode needs the low-res latent or images, but the "
                         "batch holds only a precomputed PSU latent (store the images with "
                         "`precompute_latents --store_images`, or use upsampling mode 'psu')")
    return first_stage.encode(fs_params, lowres.images)


def psu(lowres: LowRes, size: tuple[int, int], first_stage: FirstStage,
        fs_params: PyTree) -> Array:
    """Pixel-space up-sampling to the latent size `size`: bilinear in pixels, then encode."""
    if lowres.psu_latent is not None:
        return lowres.psu_latent
    images = lowres.images
    if images is None:
        images = first_stage.decode(fs_params, lowres.latent)
    f = first_stage.downsample_factor
    return first_stage.encode(fs_params, resize(images, (size[0] * f, size[1] * f), "bilinear"))


def upsample(mode: str, lowres: LowRes, size: tuple[int, int], first_stage: FirstStage,
             fs_params: PyTree, rng: jax.Array) -> Array:
    """The low-res input -> the up-sampled latent (B, *size, C) by `mode` (see MODES)."""
    if mode == "psu":
        return psu(lowres, size, first_stage, fs_params)
    z = lowres_latent(lowres, first_stage, fs_params)
    if mode == "identity":
        if z.shape[1:3] != tuple(size):
            raise ValueError(f"upsampling mode 'identity' needs a latent of the output size "
                             f"{size[0]}x{size[1]}, got {z.shape[1]}x{z.shape[2]}")
        return z
    if mode == "noise_upsampling":
        return noise_upsample(z, size, rng)
    if mode in ("bilinear", "nearest"):
        return resize(z, size, mode, antialias=False)
    raise ValueError(f"unknown upsampling mode {mode!r}; known: {MODES}")
