"""The KL autoencoder of latent diffusion (the Stable Diffusion VAE) as a Flax linen module, NHWC.

    encoder: conv_in -> [ResnetBlock x num_res_blocks, Downsample] per level -> mid (ResnetBlock,
             single-head attention, ResnetBlock) -> GroupNorm, SiLU, conv_out -> (mean, logvar)
    decoder: conv_in -> mid -> [ResnetBlock x (num_res_blocks + 1), Upsample] per level, deepest
             first -> GroupNorm, SiLU, conv_out -> image

GroupNorms have 32 groups and eps 1e-6; down-sampling pads one row and column at the bottom and
right and applies a stride-2 3x3 conv; up-sampling is nearest x2 then a 3x3 conv. Module names
follow diffusers' `AutoencoderKL` with `.` replaced by `_` (`encoder.down_blocks.0.resnets.1.conv1`
-> `encoder/down_blocks_0/resnets_1/conv1`), which `fmboost_jax.convert` relies on.

The presets `sd`, `sdxl`, `sd3` and `flux` are the VAEs of those models (same layout; SD3 and FLUX
have 16 latent channels, no quant convs, and a shift factor). Images are (B, H, W, 3) in [-1, 1],
latents (B, H/8, W/8, C). Parameters are float32; `dtype` sets the compute dtype, and GroupNorm
statistics are always taken in float32.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from fmboost_jax.models.layers import conv, group_mean, torch_default_init, upsample_nearest

Array = jax.Array
Dtype = Any

GROUPS = 32
NORM_EPS = 1e-6
LOGVAR_RANGE = (-30.0, 20.0)


@dataclasses.dataclass(frozen=True)
class AutoencoderConfig:
    """Hyperparameters of a KL autoencoder; the latent is `scale * (z - shift)`."""
    ch: int = 128
    ch_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    z_channels: int = 4
    in_channels: int = 3
    out_channels: int = 3
    use_quant_conv: bool = True
    use_post_quant_conv: bool = True
    scale_factor: float = 0.18215
    shift_factor: float = 0.0

    def __post_init__(self):
        if len(self.ch_mult) < 2:
            raise ValueError(f"ch_mult needs at least 2 levels, got {self.ch_mult}")

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.ch_mult) - 1)


PRESETS: dict[str, AutoencoderConfig] = {
    "sd": AutoencoderConfig(),
    "sdxl": AutoencoderConfig(scale_factor=0.13025),
    "sd3": AutoencoderConfig(z_channels=16, use_quant_conv=False, use_post_quant_conv=False,
                             scale_factor=1.5305, shift_factor=0.0609),
    "flux": AutoencoderConfig(z_channels=16, use_quant_conv=False, use_post_quant_conv=False,
                              scale_factor=0.3611, shift_factor=0.1159),
    # The SD layout narrowed (32 channels, one ResBlock per level): smoke runs and tests.
    "tiny": AutoencoderConfig(ch=32, num_res_blocks=1),
}


def preset(name: str, **overrides: Any) -> AutoencoderConfig:
    """A preset's config with fields replaced (e.g. a narrow `ch` for tests)."""
    if name not in PRESETS:
        raise ValueError(f"unknown autoencoder preset {name!r}; known: {sorted(PRESETS)}")
    return dataclasses.replace(PRESETS[name], **overrides)


# Collections of per-image GroupNorm statistics, {module path: {"mean", "mean_sq"}} of (B, 32):
# `norm_stats` given to `apply` makes every GroupNorm normalise with those statistics instead of
# its input's own (tiles of one image share the image's); `measured_norm_stats`, when mutable,
# receives the statistics of every GroupNorm's input.
NORM_STATS = "norm_stats"
MEASURED_NORM_STATS = "measured_norm_stats"


class GroupNorm(nn.Module):
    """GroupNorm (32 groups, eps 1e-6) with float32 statistics; the params of `nn.GroupNorm`.

    Statistics are two-pass, Var = E[(x - E[x])^2]: decoder activations reach the hundreds, where
    E[x^2] - E[x]^2 loses the digits the 1e-4 parity with PyTorch needs.
    """
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        b, c = x.shape[0], x.shape[-1]
        scale = self.param("scale", nn.initializers.ones, (c,))
        bias = self.param("bias", nn.initializers.zeros, (c,))
        xg = x.astype(jnp.float32).reshape(b, -1, GROUPS, c // GROUPS)
        given = self.has_variable(NORM_STATS, "mean")
        if self.is_mutable_collection(MEASURED_NORM_STATS) or not given:
            mean = group_mean(x, GROUPS)
            var = group_mean(jnp.square(xg - mean[:, None, :, None]).reshape(x.shape), GROUPS)
            if self.is_mutable_collection(MEASURED_NORM_STATS):
                self.put_variable(MEASURED_NORM_STATS, "mean", mean)
                self.put_variable(MEASURED_NORM_STATS, "mean_sq", var + jnp.square(mean))
        if given:
            mean = self.get_variable(NORM_STATS, "mean")
            var = jnp.maximum(self.get_variable(NORM_STATS, "mean_sq") - jnp.square(mean), 0.0)
        y = (xg - mean[:, None, :, None]) * jax.lax.rsqrt(var + NORM_EPS)[:, None, :, None]
        return (y.reshape(x.shape) * scale + bias).astype(self.dtype)


def _norm(name: str, dtype: Dtype) -> GroupNorm:
    return GroupNorm(dtype=dtype, name=name)


class ResnetBlock(nn.Module):
    """GroupNorm-SiLU-Conv3x3 twice, plus a 1x1-conv shortcut when the width changes."""
    out_channels: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        h = conv(self.out_channels, 3, "conv1", self.dtype)(nn.silu(_norm("norm1", self.dtype)(x)))
        h = conv(self.out_channels, 3, "conv2", self.dtype)(nn.silu(_norm("norm2", self.dtype)(h)))
        if x.shape[-1] != self.out_channels:
            x = conv(self.out_channels, 1, "conv_shortcut", self.dtype)(x)
        return x + h


def attention(q: Array, k: Array, v: Array, query_chunk: int = 1024) -> Array:
    """Single-head softmax attention over (B, L, C), scale 1/sqrt(C). Longer sequences go in
    chunks of `query_chunk` queries, so that a large latent (65536 positions at 2048^2 px) never
    holds the whole (L, L) matrix."""
    b, n, c = q.shape
    one = lambda q: jax.nn.dot_product_attention(q[:, :, None], k[:, :, None], v[:, :, None])[:, :, 0]
    if n <= query_chunk:
        return one(q)
    m = -(-n // query_chunk)
    q = jnp.pad(q, ((0, 0), (0, m * query_chunk - n), (0, 0)))
    out = jax.lax.map(one, q.reshape(b, m, query_chunk, c).swapaxes(0, 1))
    return out.swapaxes(0, 1).reshape(b, m * query_chunk, c)[:, :n]


class Attention(nn.Module):
    """Single-head self-attention over all H*W positions, with a residual connection."""
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        b, h, w, c = x.shape
        y = _norm("group_norm", self.dtype)(x).reshape(b, h * w, c)
        dense = lambda name: nn.Dense(c, dtype=self.dtype, kernel_init=torch_default_init, name=name)
        q, k, v = dense("to_q")(y), dense("to_k")(y), dense("to_v")(y)
        return x + dense("to_out_0")(attention(q, k, v)).reshape(b, h, w, c)


class MidBlock(nn.Module):
    channels: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        x = ResnetBlock(self.channels, self.dtype, name="resnets_0")(x)
        x = Attention(self.dtype, name="attentions_0")(x)
        return ResnetBlock(self.channels, self.dtype, name="resnets_1")(x)


class Downsample(nn.Module):
    """Zero pad bottom/right by one, then Conv3x3 stride 2 (no symmetric padding)."""
    channels: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        return conv(self.channels, 3, "conv", self.dtype, stride=2, padding=((0, 1), (0, 1)))(x)


class Upsample(nn.Module):
    """Nearest x2, then Conv3x3."""
    channels: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        return conv(self.channels, 3, "conv", self.dtype)(upsample_nearest(x))


# Parts of the encoder and decoder (`part=`): "pixels" is every level above the latent resolution,
# "latent" the rest (the deepest level, the attention block, the output layers), "all" both. Tiled
# coding runs the pixel part tile by tile and the latent part, with its global attention, on the
# whole latent.


class Encoder(nn.Module):
    config: AutoencoderConfig
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array, part: str = "all") -> Array:
        """(B, H, W, in) -> moments (B, H/f, W/f, 2 * z_channels). `part="pixels"` stops at the
        latent resolution ((B, H/f, W/f, ch * ch_mult[-2])); `part="latent"` starts there."""
        cfg, last = self.config, len(self.config.ch_mult) - 1
        h = x.astype(self.dtype)
        if part in ("all", "pixels"):
            h = conv(cfg.ch, 3, "conv_in", self.dtype)(h)
            for i, mult in enumerate(cfg.ch_mult[:-1]):
                for j in range(cfg.num_res_blocks):
                    h = ResnetBlock(cfg.ch * mult, self.dtype, name=f"down_blocks_{i}_resnets_{j}")(h)
                h = Downsample(cfg.ch * mult, self.dtype, name=f"down_blocks_{i}_downsamplers_0")(h)
            if part == "pixels":
                return h
        for j in range(cfg.num_res_blocks):
            h = ResnetBlock(cfg.ch * cfg.ch_mult[-1], self.dtype,
                            name=f"down_blocks_{last}_resnets_{j}")(h)
        h = MidBlock(cfg.ch * cfg.ch_mult[-1], self.dtype, name="mid_block")(h)
        h = nn.silu(_norm("conv_norm_out", self.dtype)(h))
        # The moments are computed in float32 whatever the compute dtype: they are the flow's
        # targets x1 and its PSU context, which bfloat16 would round to 8 bits of mantissa.
        return conv(2 * cfg.z_channels, 3, "conv_out", jnp.float32)(h)


class Decoder(nn.Module):
    config: AutoencoderConfig
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, z: Array, part: str = "all") -> Array:
        """(B, h, w, z_channels) -> (B, h*f, w*f, out). `part="latent"` stops before the first
        up-sampling ((B, h, w, ch * ch_mult[-1])); `part="pixels"` starts there."""
        cfg, last = self.config, len(self.config.ch_mult) - 1
        top = cfg.ch * cfg.ch_mult[-1]
        h = z.astype(self.dtype)
        if part in ("all", "latent"):
            h = conv(top, 3, "conv_in", self.dtype)(h)
            h = MidBlock(top, self.dtype, name="mid_block")(h)
            for j in range(cfg.num_res_blocks + 1):  # up_blocks_0 is the deepest level
                h = ResnetBlock(top, self.dtype, name=f"up_blocks_0_resnets_{j}")(h)
            if part == "latent":
                return h
        for i, mult in enumerate(reversed(cfg.ch_mult)):
            if i > 0:
                for j in range(cfg.num_res_blocks + 1):
                    h = ResnetBlock(cfg.ch * mult, self.dtype, name=f"up_blocks_{i}_resnets_{j}")(h)
            if i < last:
                h = Upsample(cfg.ch * mult, self.dtype, name=f"up_blocks_{i}_upsamplers_0")(h)
        h = nn.silu(_norm("conv_norm_out", self.dtype)(h))
        return conv(cfg.out_channels, 3, "conv_out", self.dtype)(h)


class AutoencoderKL(nn.Module):
    """`encode(x) -> (mean, logvar)`, `decode(z) -> x`; raw latents (no scale or shift)."""
    config: AutoencoderConfig = AutoencoderConfig()
    dtype: Dtype = jnp.float32

    def setup(self):
        cfg = self.config
        self.encoder = Encoder(cfg, self.dtype)
        self.decoder = Decoder(cfg, self.dtype)
        # The 1x1 convs next to the latent compute in float32 (the latents are never rounded).
        conv1x1 = lambda c: nn.Conv(c, (1, 1), dtype=jnp.float32, kernel_init=torch_default_init)
        if cfg.use_quant_conv:
            self.quant_conv = conv1x1(2 * cfg.z_channels)
        if cfg.use_post_quant_conv:
            self.post_quant_conv = conv1x1(cfg.z_channels)

    def encode(self, x: Array) -> tuple[Array, Array]:
        """Images (B, H, W, 3) in [-1, 1] -> posterior mean and clipped logvar, float32."""
        return self.encode_latent_part(self.encoder(x, "pixels"))

    def encode_pixel_part(self, x: Array) -> Array:
        """Images (B, H, W, 3) -> encoder features at the latent resolution (B, H/f, W/f, C')."""
        return self.encoder(x, "pixels")

    def encode_latent_part(self, h: Array) -> tuple[Array, Array]:
        """Encoder features (B, h, w, C') -> posterior mean and clipped logvar, float32."""
        moments = self.encoder(h, "latent")
        if self.config.use_quant_conv:
            moments = self.quant_conv(moments)
        mean, logvar = jnp.split(moments.astype(jnp.float32), 2, axis=-1)
        return mean, jnp.clip(logvar, *LOGVAR_RANGE)

    def decode(self, z: Array) -> Array:
        """Raw latents (B, h, w, C) -> images (B, 8h, 8w, 3), float32 (not clipped)."""
        return self.decode_pixel_part(self.decode_latent_part(z))

    def decode_latent_part(self, z: Array) -> Array:
        """Raw latents (B, h, w, C) -> decoder features before the first up-sampling (B, h, w, C')."""
        if self.config.use_post_quant_conv:
            z = self.post_quant_conv(z.astype(jnp.float32))
        return self.decoder(z, "latent")

    def decode_pixel_part(self, h: Array) -> Array:
        """Decoder features (B, h, w, C') -> images (B, 8h, 8w, 3), float32 (not clipped)."""
        return self.decoder(h, "pixels").astype(jnp.float32)

    def __call__(self, x: Array) -> Array:
        """Reconstruction through the posterior mode (used to initialise every parameter)."""
        return self.decode(self.encode(x)[0])


# ------------------------------------------------------------------------ the posterior
def posterior_sample(mean: Array, logvar: Array, rng: jax.Array) -> Array:
    """z = mean + exp(logvar / 2) * eps, eps ~ N(0, I)."""
    return mean + jnp.exp(0.5 * logvar) * jax.random.normal(rng, mean.shape, mean.dtype)


@functools.partial(jax.jit, static_argnums=(0, 2))
def init_params(model: AutoencoderKL, rng: jax.Array, image_size: int | None = None) -> Any:
    """Randomly initialised params (torch's default init), traced at a small image size; one
    compiled program (op by op, the initialisers take about 1.5 times as long)."""
    size = image_size or model.config.downsample_factor
    x = jnp.zeros((1, size, size, model.config.in_channels), jnp.float32)
    return model.init(rng, x)["params"]


def param_shapes(model: AutoencoderKL) -> Any:
    """The params as a tree of `jax.ShapeDtypeStruct` (nothing is computed)."""
    size = model.config.downsample_factor
    x = jax.ShapeDtypeStruct((1, size, size, model.config.in_channels), jnp.float32)
    return jax.eval_shape(model.init, jax.random.key(0), x)["params"]
