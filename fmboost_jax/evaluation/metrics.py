"""Image quality metrics on images in [-1, 1] (the reference's conventions).

PSNR per image on [0, 1] after clipping, then averaged; SSIM with an 11x11 Gaussian
window (sigma 1.5) on [0, 1], as torchmetrics' default used by the reference; MSE on the
[-1, 1] values themselves, unclipped (the reference's `mse_loss(pred, target)`; its batch mean is
the mean of these per-image values).
"""

from __future__ import annotations

import dm_pix
import jax
import jax.numpy as jnp

Array = jax.Array


def to_unit(images: Array) -> Array:
    """[-1, 1] -> [0, 1], clipped."""
    return jnp.clip(images * 0.5 + 0.5, 0.0, 1.0)


def mse(pred: Array, target: Array) -> Array:
    """Per-image mean squared error of (B, H, W, C) images in [-1, 1] -> (B,)."""
    return jnp.mean(jnp.square(pred - target), axis=(1, 2, 3))


def psnr(pred: Array, target: Array) -> Array:
    """Per-image PSNR in dB of (B, H, W, C) images in [-1, 1] -> (B,)."""
    mse = jnp.mean(jnp.square(to_unit(pred) - to_unit(target)), axis=(1, 2, 3))
    return -10.0 * jnp.log10(jnp.maximum(mse, 1e-12))


def ssim(pred: Array, target: Array) -> Array:
    """Per-image SSIM of (B, H, W, C) images in [-1, 1] -> (B,)."""
    return dm_pix.ssim(to_unit(pred), to_unit(target), max_val=1.0, filter_size=11,
                       filter_sigma=1.5)
