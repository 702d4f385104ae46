"""The paper's EfficientUNet as a Flax linen module (NHWC).

Layer for layer the network of the reference implementation
(`fmboost/models/unet/model.py`): a sinusoidal embedding of the raw flow time
`t in [0, 1]`, ResBlocks with scale-shift norm, optional (linear) self-attention,
strided-conv down-sampling, nearest up-sampling, zero-initialised output convs.

Module names mirror the reference's PyTorch attribute paths with `.` replaced by
`_` (`input_blocks.1.0.in_layers.2` -> `input_blocks_1_0/in_layers_2`), so that
`fmboost_jax.convert` maps a PyTorch state dict onto the params one to one.

Shapes: `x` (B, H, W, C_x), `t` (B,) or scalar, `context` (B, H, W, C_c); the
output is (B, H, W, out_channels). Parameters are float32; `dtype` sets the
compute dtype (float32 or bfloat16).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from fmboost_jax.models.layers import conv, dense, group_mean, torch_default_init, upsample_nearest, zeros

Array = jax.Array
Dtype = Any

GROUPS = 32
NORM_EPS = 1e-5  # PyTorch's GroupNorm default (Flax's is 1e-6).


def timestep_embedding(t: Array, dim: int, max_period: float = 10000.0) -> Array:
    """Sinusoidal embedding of `t` (B,) -> (B, dim), `[cos, sin]` order as the reference."""
    half = dim // 2
    freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
    args = t.astype(jnp.float32)[:, None] * freqs[None]
    emb = jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)
    if dim % 2:
        emb = jnp.concatenate([emb, jnp.zeros_like(emb[:, :1])], axis=-1)
    return emb


class GroupNorm(nn.Module):
    """GroupNorm(32 groups, eps 1e-5) over (B, ..., C), with the parameters of `nn.GroupNorm`.

    Statistics are taken in float32 in two passes (the mean, then the mean square about it:
    exact for activations with a large mean, as PyTorch's); the normalisation, the affine
    and an optional per-sample modulation `* (1 + scale) + shift` ((B, C) each) are folded into
    a single per-(sample, channel) multiply-add, which is cheaper to run and to differentiate.
    """
    num_groups: int = GROUPS
    epsilon: float = NORM_EPS
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array, scale: Array | None = None, shift: Array | None = None) -> Array:
        b, c = x.shape[0], x.shape[-1]
        gamma = self.param("scale", nn.initializers.ones, (c,))
        beta = self.param("bias", zeros, (c,))
        xf = x.astype(jnp.float32)
        bcast = (b,) + (1,) * (x.ndim - 2) + (c,)
        per_channel = lambda v: jnp.repeat(v, c // self.num_groups, axis=-1)  # (B, G) -> (B, C)
        mean = group_mean(xf, self.num_groups)
        # Two passes: E[x^2] - E[x]^2 cancels catastrophically when |mean| >> std.
        var = group_mean(jnp.square(xf - per_channel(mean).reshape(bcast)), self.num_groups)
        mul = per_channel(jax.lax.rsqrt(var + self.epsilon)) * gamma
        add = beta - per_channel(mean) * mul
        if scale is not None:
            mul, add = mul * (1 + scale), add * (1 + scale) + shift
        y = xf * mul.reshape(bcast) + add.reshape(bcast)
        return y.astype(self.dtype)


def _group_norm(name: str, dtype: Dtype) -> GroupNorm:
    return GroupNorm(dtype=dtype, name=name)


class ResBlock(nn.Module):
    """GroupNorm-SiLU-Conv, time embedding (scale-shift or additive), GroupNorm-SiLU-Dropout-Conv(0)."""
    out_channels: int
    dropout: float = 0.0
    use_scale_shift_norm: bool = True
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array, emb: Array, train: bool = False) -> Array:
        h = nn.silu(_group_norm("in_layers_0", self.dtype)(x))
        h = conv(self.out_channels, 3, "in_layers_2", self.dtype)(h)
        emb_dim = 2 * self.out_channels if self.use_scale_shift_norm else self.out_channels
        emb_out = dense(emb_dim, "emb_layers_1", self.dtype)(nn.silu(emb)).astype(jnp.float32)
        norm = _group_norm("out_layers_0", self.dtype)
        if self.use_scale_shift_norm:
            scale, shift = jnp.split(emb_out, 2, axis=-1)
            h = norm(h, scale, shift)
        else:
            h = norm(h + emb_out[:, None, None, :].astype(h.dtype))
        h = nn.silu(h)
        h = nn.Dropout(self.dropout, deterministic=not train)(h)
        h = conv(self.out_channels, 3, "out_layers_3", self.dtype, zero_init=True)(h)
        if x.shape[-1] != self.out_channels:
            x = conv(self.out_channels, 1, "skip_connection", self.dtype)(x)
        return x + h


# How `softmax_attention` computes (`config.unet.attention`, a field of the module, so part of
# what jit traces): "einsum" (two einsums around a float32 softmax, the default) or
# `jax.nn.dot_product_attention` with implementation "xla" or "cudnn" (cuDNN's fused flash
# attention on NVIDIA GPUs; it takes only bfloat16/float16, so float32 models use "xla" there).
ATTENTION_IMPLEMENTATIONS = ("einsum", "xla", "cudnn")


def softmax_attention(q: Array, k: Array, v: Array, implementation: str = "einsum") -> Array:
    """Scaled dot-product attention over (B, heads, L, d); softmax in float32."""
    impl = implementation
    if impl not in ATTENTION_IMPLEMENTATIONS:
        raise ValueError(f"unknown attention implementation {impl!r}; known: "
                         f"{', '.join(ATTENTION_IMPLEMENTATIONS)}")
    if impl != "einsum":
        if impl == "cudnn" and q.dtype not in (jnp.bfloat16, jnp.float16):
            impl = "xla"
        heads_third = lambda a: jnp.swapaxes(a, 1, 2)         # (B, L, heads, d)
        out = jax.nn.dot_product_attention(heads_third(q), heads_third(k), heads_third(v),
                                           implementation=impl)
        return heads_third(out)
    chunk = query_chunk(q.shape[1], q.shape[2])
    if chunk == q.shape[2]:
        return _einsum_attention(q, k, v)
    b, h, n, d = q.shape                       # query blocks, one after another: (n/chunk, ...)
    blocks = jnp.moveaxis(q.reshape(b, h, n // chunk, chunk, d), 2, 0)
    out = jax.lax.map(lambda qb: _einsum_attention(qb, k, v), blocks)
    return jnp.moveaxis(out, 0, 2).reshape(b, h, n, v.shape[-1])


# The softmax attention's scores of one example, (heads, L, L) in float32, are computed whole up
# to this size and in blocks of queries above it. At 512² px the demo UNet's middle block attends
# over 128² positions: 4 GiB of scores, which took its forward from 78 ms at 128² px to 5.9 s on a
# 2-core AMD EPYC (3.9 s in blocks). The released UNet at 128² latents attends over 16² positions
# (1 MiB): its training and boosts up to 2048² px compute whole.
ATTENTION_SCORES_BYTES = 16 * 2**20


def query_chunk(heads: int, length: int) -> int:
    """Queries per block: `length` when an example's score matrix fits ATTENTION_SCORES_BYTES,
    else the largest power-of-two divisor of `length` whose block does (at least 1)."""
    row = heads * length * 4
    if row * length <= ATTENTION_SCORES_BYTES:
        return length
    chunk = 1
    while length % (2 * chunk) == 0 and 2 * chunk * row <= ATTENTION_SCORES_BYTES:
        chunk *= 2
    return chunk


def _einsum_attention(q: Array, k: Array, v: Array) -> Array:
    scale = 1.0 / math.sqrt(q.shape[-1])
    logits = jnp.einsum("bhqd,bhkd->bhqk", q, k).astype(jnp.float32) * scale
    weights = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    return jnp.einsum("bhqk,bhkd->bhqd", weights, v)


def linear_attention(q: Array, k: Array, v: Array) -> Array:
    """Linear attention (Shen et al.): softmax of q over features, of k over positions."""
    scale = 1.0 / math.sqrt(q.shape[-1])
    q = jax.nn.softmax(q.astype(jnp.float32), axis=-1) * scale
    k = jax.nn.softmax(k.astype(jnp.float32), axis=-2)
    context = jnp.einsum("bhnd,bhne->bhde", k, v.astype(jnp.float32))
    return jnp.einsum("bhnd,bhde->bhne", q, context).astype(v.dtype)


class SpatialSelfAttention(nn.Module):
    """Multi-head self-attention over all positions with a residual connection.

    Keeps the reference's index layout: the (B, 3*inner, L) projection is reshaped
    *without transposing* to (B, heads, L, 3*dim_head) before the q/k/v split, and the
    (B, heads, L, dim_head) result is reshaped back to (B, inner, L) the same way.
    """
    heads: int = 4
    dim_head: int = 64
    use_linear: bool = False
    implementation: str = "einsum"       # of the softmax attention (ATTENTION_IMPLEMENTATIONS)
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        b, h, w, c = x.shape
        n = h * w
        inner = self.heads * self.dim_head
        x_flat = x.reshape(b, n, c)
        qkv = dense(3 * inner, "qkv", self.dtype)(_group_norm("norm", self.dtype)(x_flat))
        qkv = jnp.swapaxes(qkv, 1, 2).reshape(b, self.heads, n, 3 * self.dim_head)
        q, k, v = jnp.split(qkv, 3, axis=-1)
        out = (linear_attention(q, k, v) if self.use_linear else
               softmax_attention(q, k, v, self.implementation)).reshape(b, inner, n)
        out = dense(c, "proj_out", self.dtype, zero_init=True)(jnp.swapaxes(out, 1, 2))
        return (x_flat + out).reshape(b, h, w, c)


class Downsample(nn.Module):
    """Conv3x3 stride 2 (padding 1), or 2x2 average pooling when `use_conv=False`."""
    use_conv: bool = True
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        if self.use_conv:
            return conv(x.shape[-1], 3, "op", self.dtype, stride=2)(x)
        return nn.avg_pool(x, (2, 2), strides=(2, 2))


class Upsample(nn.Module):
    """Nearest-neighbour x2, then an optional Conv3x3."""
    use_conv: bool = True
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        x = upsample_nearest(x)
        if self.use_conv:
            x = conv(x.shape[-1], 3, "conv", self.dtype)(x)
        return x


class UnPool2d(nn.Module):
    """Transposed conv with kernel = stride = `factor` (B, h, w, C) -> (B, h*f, w*f, out).

    Non-overlapping, so it is a per-pixel linear map followed by depth-to-space.
    `kernel` is (f, f, in, out), PyTorch's ConvTranspose2d weight (in, out, f, f) permuted.
    """
    features: int
    factor: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        f, c_in = self.factor, x.shape[-1]
        # torch's ConvTranspose2d weight is (in, out, f, f) and its default init takes fan_in
        # from dim 1 and the receptive field: out * f^2, here the axes (0, 1, 3).
        init = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform", in_axis=(0, 1, 3),
                                                out_axis=2)
        kernel = self.param("kernel", init, (f, f, c_in, self.features))
        bias = self.param("bias", zeros, (self.features,))
        x, kernel = x.astype(self.dtype), kernel.astype(self.dtype)
        y = jnp.einsum("bijc,xyco->bixjyo", x, kernel)
        b, h, _, w, _, o = y.shape
        return y.reshape(b, h * f, w * f, o) + bias.astype(self.dtype)


class EfficientUNet(nn.Module):
    """UNet of the paper. Hyperparameter names are the reference's; their values come from
    `config.unet` (`EfficientUNet(**config.unet)`), the released ones in `base_config()`.

    Attributes:
      in_channels: channels after concatenating `x` and `context` (8 for SD latents
        with concatenated context); checked against the input.
      model_channels: base width C; the time embedding has 4C features.
      out_channels: channels of the predicted velocity.
      num_res_blocks: ResBlocks per level on the way down (one more on the way up).
      attention_resolutions: down-sampling factors `ds` at which self-attention runs.
      channel_mult: width multiplier per level; a level ends with a Downsample
        except the last.
      pool_factor: > 1 adds a strided patchify conv before and a transposed conv after.
      remat: recompute each ResBlock's and attention block's activations in the backward pass
        instead of keeping them (less memory in training, about a third more compute).
    """
    in_channels: int
    model_channels: int
    out_channels: int
    num_res_blocks: int
    attention_resolutions: Sequence[int]
    dropout: float
    channel_mult: Sequence[int]
    conv_resample: bool
    dim_head: int
    num_heads: int
    use_linear_attn: bool
    use_scale_shift_norm: bool
    pool_factor: int
    attention: str = "einsum"            # softmax attention's implementation
    remat: bool = False
    dtype: Dtype = jnp.float32

    @classmethod
    def from_config(cls, unet: Any, dtype: Dtype = jnp.float32) -> EfficientUNet:
        """The UNet of a `config.unet` block."""
        return cls(**{k: tuple(v) if isinstance(v, (list, tuple)) else v
                      for k, v in unet.items()}, dtype=dtype)

    @property
    def downsampling(self) -> int:
        """Total down-sampling factor: input sizes must be multiples of it."""
        return 2 ** (len(self.channel_mult) - 1) * max(self.pool_factor, 1)

    @nn.compact
    def __call__(self, x: Array, t: Array, context: Array | None = None,
                 train: bool = False) -> Array:
        """(B, H, W, C_x), (B,) or (), optional (B, H, W, C_c) -> (B, H, W, out_channels)."""
        C, dt = self.model_channels, self.dtype
        t = jnp.broadcast_to(jnp.asarray(t, jnp.float32), (x.shape[0],))
        emb = timestep_embedding(t, C)
        emb = dense(4 * C, "time_embed_2", dt)(nn.silu(dense(4 * C, "time_embed_0", dt)(emb)))

        if context is not None:
            x = jnp.concatenate([x, context.astype(x.dtype)], axis=-1)
        if x.shape[1] % self.downsampling or x.shape[2] % self.downsampling:
            raise ValueError(f"EfficientUNet: input {x.shape[1]}x{x.shape[2]} is not a multiple "
                             f"of the total down-sampling {self.downsampling}")
        if x.shape[-1] != self.in_channels:
            raise ValueError(f"EfficientUNet: in_channels={self.in_channels} but x and context "
                             f"together have {x.shape[-1]} channels (shape {x.shape}).")
        h = x.astype(dt)
        if self.pool_factor > 1:
            f = self.pool_factor
            h = nn.Conv(C, (f, f), strides=(f, f), padding="VALID", dtype=dt, name="pool",
                        kernel_init=torch_default_init)(h)

        # With remat, blocks keep only their inputs for the backward pass (`train` is static).
        Res = nn.remat(ResBlock, static_argnums=(3,)) if self.remat else ResBlock
        Attention = nn.remat(SpatialSelfAttention) if self.remat else SpatialSelfAttention
        res = dict(dropout=self.dropout, use_scale_shift_norm=self.use_scale_shift_norm, dtype=dt)
        attn = dict(heads=self.num_heads, dim_head=self.dim_head, dtype=dt,
                    implementation=self.attention)

        # Down path: every block's output is kept as a skip.
        hs = [conv(C, 3, "input_blocks_0_0", dt)(h)]
        h, ds, block = hs[0], 1, 1
        for level, mult in enumerate(self.channel_mult):
            for _ in range(self.num_res_blocks):
                h = Res(mult * C, name=f"input_blocks_{block}_0", **res)(h, emb, train)
                if ds in self.attention_resolutions:
                    h = Attention(use_linear=self.use_linear_attn,
                                  name=f"input_blocks_{block}_1", **attn)(h)
                hs.append(h)
                block += 1
            if level != len(self.channel_mult) - 1:
                h = Downsample(self.conv_resample, dt, name=f"input_blocks_{block}_0")(h)
                hs.append(h)
                block += 1
                ds *= 2

        # Middle: ResBlock, softmax self-attention, ResBlock.
        ch = h.shape[-1]
        h = Res(ch, name="middle_block_0", **res)(h, emb, train)
        h = Attention(use_linear=False, name="middle_block_1", **attn)(h)
        h = Res(ch, name="middle_block_2", **res)(h, emb, train)

        # Up path: num_res_blocks + 1 blocks per level, each consuming one skip.
        block = 0
        for level, mult in reversed(list(enumerate(self.channel_mult))):
            for i in range(self.num_res_blocks + 1):
                h = jnp.concatenate([h, hs.pop()], axis=-1)
                h = Res(mult * C, name=f"output_blocks_{block}_0", **res)(h, emb, train)
                sub = 1
                if ds in self.attention_resolutions:
                    h = Attention(use_linear=self.use_linear_attn,
                                  name=f"output_blocks_{block}_{sub}", **attn)(h)
                    sub += 1
                if level and i == self.num_res_blocks:
                    h = Upsample(self.conv_resample, dt, name=f"output_blocks_{block}_{sub}")(h)
                    ds //= 2
                block += 1

        h = nn.silu(_group_norm("out_0", dt)(h))
        if self.pool_factor > 1:
            h = conv(C, 3, "out_2", dt)(h)
            h = UnPool2d(self.out_channels, self.pool_factor, dt, name="un_pool")(h)
        else:
            h = conv(self.out_channels, 3, "out_2", dt, zero_init=True)(h)
        return h.astype(jnp.float32)
