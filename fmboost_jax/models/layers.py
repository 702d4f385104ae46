"""Layers shared by the UNet and the VAE: PyTorch-style initialisation, convolutions, dense
layers, nearest up-sampling, GroupNorm statistics, parameter counts. NHWC throughout."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

Array = jax.Array
Dtype = Any

# PyTorch's default init for Conv/Linear weights: U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
torch_default_init = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")
zeros = nn.initializers.zeros


def conv(features: int, kernel: int, name: str, dtype: Dtype, stride: int = 1,
         padding: Any = None, zero_init: bool = False) -> nn.Conv:
    """A `kernel` x `kernel` convolution, 'same' padding unless `padding` is given."""
    pad = kernel // 2
    return nn.Conv(features, (kernel, kernel), strides=(stride, stride),
                   padding=padding if padding is not None else ((pad, pad), (pad, pad)),
                   dtype=dtype, name=name, kernel_init=zeros if zero_init else torch_default_init)


def dense(features: int, name: str, dtype: Dtype, zero_init: bool = False) -> nn.Dense:
    return nn.Dense(features, dtype=dtype, name=name,
                    kernel_init=zeros if zero_init else torch_default_init)


def upsample_nearest(x: Array, factor: int = 2) -> Array:
    """(B, H, W, C) -> (B, factor H, factor W, C), every pixel repeated."""
    return jnp.repeat(jnp.repeat(x, factor, axis=1), factor, axis=2)


def group_mean(x: Array, groups: int) -> Array:
    """Mean over positions and each group's channels, (B, ..., C) -> (B, groups), in float32.
    Sums over the positions first ((B, L, C) -> (B, C): contiguous rows), then over each group's
    channels: on CPU several times faster than reducing (B, L, G, C/G) over axes (1, 3) at once."""
    b, c = x.shape[0], x.shape[-1]
    rows = jnp.sum(x.reshape(b, -1, c).astype(jnp.float32), axis=1)
    return jnp.sum(rows.reshape(b, groups, c // groups), axis=-1) / (x.size // (b * groups))


def count_params(params: Any) -> int:
    """Number of scalars in a params tree (arrays or ShapeDtypeStructs)."""
    return sum(int(p.size) for p in jax.tree.leaves(params))
