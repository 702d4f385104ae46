"""A compact PyTorch re-implementation of the reference EfficientUNet (NCHW), used as a test oracle.

Written from the description in `shared/REFERENCE.md` ("The UNet"); the state-dict key names
equal the reference's (`input_blocks.1.0.in_layers.2.weight`, `middle_block.1.qkv.weight`,
`pool.down_conv.weight`, ...), so its state dict stands in for a reference checkpoint.

Shapes: `x` (B, C_x, H, W), `t` (B,), `context` (B, C_c, H, W) -> (B, out_channels, H, W).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn


def _zero(module: nn.Module) -> nn.Module:
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


def timestep_embedding(t: Tensor, dim: int, max_period: float = 10000.0) -> Tensor:
    """(B,) -> (B, dim): `[cos(t * f), sin(t * f)]`, f = exp(-ln(max_period) * i / half)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device)
                      / half)
    args = t.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    return F.pad(emb, (0, dim % 2))


class ResBlock(nn.Module):
    """(B, C_in, H, W), (B, E) -> (B, C_out, H, W)."""

    def __init__(self, channels: int, emb_channels: int, out_channels: int, dropout: float,
                 use_scale_shift_norm: bool):
        super().__init__()
        self.use_scale_shift_norm = use_scale_shift_norm
        self.in_layers = nn.Sequential(nn.GroupNorm(32, channels), nn.SiLU(),
                                       nn.Conv2d(channels, out_channels, 3, padding=1))
        emb_out = 2 * out_channels if use_scale_shift_norm else out_channels
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_channels, emb_out))
        self.out_layers = nn.Sequential(nn.GroupNorm(32, out_channels), nn.SiLU(), nn.Dropout(dropout),
                                        _zero(nn.Conv2d(out_channels, out_channels, 3, padding=1)))
        self.skip_connection = (nn.Identity() if channels == out_channels
                                else nn.Conv2d(channels, out_channels, 1))

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        h = self.in_layers(x)
        e = self.emb_layers(emb)[:, :, None, None]
        norm, rest = self.out_layers[0], self.out_layers[1:]
        if self.use_scale_shift_norm:
            scale, shift = e.chunk(2, dim=1)
            h = rest(norm(h) * (1 + scale) + shift)
        else:
            h = rest(norm(h + e))
        return self.skip_connection(x) + h


class SpatialSelfAttention(nn.Module):
    """(B, C, H, W) -> (B, C, H, W); the qkv tensor is reshaped to heads without a transpose."""

    def __init__(self, dim: int, heads: int, dim_head: int, use_linear: bool):
        super().__init__()
        self.heads, self.dim_head, self.use_linear = heads, dim_head, use_linear
        inner = heads * dim_head
        self.norm = nn.GroupNorm(32, dim)
        self.qkv = nn.Conv1d(dim, 3 * inner, 1)
        self.proj_out = _zero(nn.Conv1d(inner, dim, 1))

    def forward(self, x: Tensor) -> Tensor:
        b, c, h, w = x.shape
        x = x.reshape(b, c, h * w)
        qkv = self.qkv(self.norm(x)).reshape(b, self.heads, h * w, 3 * self.dim_head)
        q, k, v = qkv.chunk(3, dim=-1)
        if self.use_linear:
            q = q.softmax(dim=-1) / math.sqrt(self.dim_head)
            k = k.softmax(dim=-2)
            out = q @ (k.transpose(-1, -2) @ v)
        else:
            weights = (q @ k.transpose(-1, -2) / math.sqrt(self.dim_head)).softmax(dim=-1)
            out = weights @ v
        out = self.proj_out(out.reshape(b, self.heads * self.dim_head, h * w))
        return (x + out).reshape(b, c, h, w)


class Downsample(nn.Module):
    """(B, C, H, W) -> (B, C, H/2, W/2): strided conv `op`, or 2x2 average pooling."""

    def __init__(self, channels: int, use_conv: bool):
        super().__init__()
        self.op = nn.Conv2d(channels, channels, 3, stride=2, padding=1) if use_conv else nn.AvgPool2d(2)

    def forward(self, x: Tensor) -> Tensor:
        return self.op(x)


class Upsample(nn.Module):
    """(B, C, H, W) -> (B, C, 2H, 2W): nearest, then an optional conv."""

    def __init__(self, channels: int, use_conv: bool):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1) if use_conv else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2, mode="nearest"))


class Pool2d(nn.Module):
    def __init__(self, c_in: int, c_out: int, factor: int):
        super().__init__()
        self.down_conv = nn.Conv2d(c_in, c_out, factor, stride=factor)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_conv(x)


class UnPool2d(nn.Module):
    def __init__(self, c_in: int, c_out: int, factor: int):
        super().__init__()
        self.up_conv = nn.ConvTranspose2d(c_in, c_out, factor, stride=factor)

    def forward(self, x: Tensor) -> Tensor:
        return self.up_conv(x)


class TimestepEmbedSequential(nn.Sequential):
    """Sequential that hands the time embedding to its ResBlocks."""

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:  # type: ignore[override]
        for layer in self:
            x = layer(x, emb) if isinstance(layer, ResBlock) else layer(x)
        return x


class EfficientUNet(nn.Module):
    """The reference UNet; constructor arguments as in the reference."""

    def __init__(self, in_channels: int, model_channels: int, out_channels: int, num_res_blocks: int,
                 attention_resolutions: Sequence[int], dropout: float = 0.0,
                 channel_mult: Sequence[int] = (1, 2, 3, 4), conv_resample: bool = True,
                 dim_head: int = 64, num_heads: int = 4, use_linear_attn: bool = True,
                 use_scale_shift_norm: bool = True, pool_factor: int = -1):
        super().__init__()
        C, E = model_channels, 4 * model_channels
        self.model_channels = C
        res = dict(emb_channels=E, dropout=dropout, use_scale_shift_norm=use_scale_shift_norm)

        def attention(ch: int, linear: bool) -> SpatialSelfAttention:
            return SpatialSelfAttention(ch, num_heads, dim_head, linear)

        self.time_embed = nn.Sequential(nn.Linear(C, E), nn.SiLU(), nn.Linear(E, E))
        pooled = pool_factor > 1
        self.pool = Pool2d(in_channels, C, pool_factor) if pooled else nn.Identity()

        self.input_blocks = nn.ModuleList(
            [TimestepEmbedSequential(nn.Conv2d(C if pooled else in_channels, C, 3, padding=1))])
        skips, ch, ds = [C], C, 1
        for level, mult in enumerate(channel_mult):
            for _ in range(num_res_blocks):
                layers: list[nn.Module] = [ResBlock(ch, out_channels=mult * C, **res)]
                ch = mult * C
                if ds in attention_resolutions:
                    layers.append(attention(ch, use_linear_attn))
                self.input_blocks.append(TimestepEmbedSequential(*layers))
                skips.append(ch)
            if level != len(channel_mult) - 1:
                self.input_blocks.append(TimestepEmbedSequential(Downsample(ch, conv_resample)))
                skips.append(ch)
                ds *= 2

        self.middle_block = TimestepEmbedSequential(
            ResBlock(ch, out_channels=ch, **res), attention(ch, False), ResBlock(ch, out_channels=ch, **res))

        self.output_blocks = nn.ModuleList()
        for level, mult in reversed(list(enumerate(channel_mult))):
            for i in range(num_res_blocks + 1):
                layers = [ResBlock(ch + skips.pop(), out_channels=mult * C, **res)]
                ch = mult * C
                if ds in attention_resolutions:
                    layers.append(attention(ch, use_linear_attn))
                if level and i == num_res_blocks:
                    layers.append(Upsample(ch, conv_resample))
                    ds //= 2
                self.output_blocks.append(TimestepEmbedSequential(*layers))

        out_conv = nn.Conv2d(C, C if pooled else out_channels, 3, padding=1)
        self.out = nn.Sequential(nn.GroupNorm(32, ch), nn.SiLU(), out_conv if pooled else _zero(out_conv))
        self.un_pool = UnPool2d(C, out_channels, pool_factor) if pooled else nn.Identity()

    def forward(self, x: Tensor, t: Tensor, context: Tensor | None = None) -> Tensor:
        emb = self.time_embed(timestep_embedding(t, self.model_channels))
        if context is not None:
            x = torch.cat([x, context], dim=1)
        h = self.pool(x)
        hs = []
        for block in self.input_blocks:
            h = block(h, emb)
            hs.append(h)
        h = self.middle_block(h, emb)
        for block in self.output_blocks:
            h = block(torch.cat([h, hs.pop()], dim=1), emb)
        return self.un_pool(self.out(h))


# A small UNet of the reference's layout, and random weights for it (the tests' oracle).
SMALL = dict(in_channels=8, model_channels=32, out_channels=4, num_res_blocks=1,
            attention_resolutions=(2,), dropout=0.0, channel_mult=(1, 2, 2), conv_resample=True,
            dim_head=16, num_heads=2, use_linear_attn=False, use_scale_shift_norm=True,
            pool_factor=-1)


def randomized_torch_unet(config: dict[str, Any], seed: int = 0) -> EfficientUNet:
    """The oracle with every parameter random (the zero-initialised convs included)."""
    torch.manual_seed(seed)
    model = EfficientUNet(**config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1:
                is_norm_scale = name.endswith("weight")
                p.copy_((1.0 if is_norm_scale else 0.0) + 0.1 * torch.randn_like(p))
            else:
                p.normal_(0.0, p[0].numel() ** -0.5)
    return model


def numpy_state_dict(model: nn.Module) -> dict[str, np.ndarray]:
    return {k: v.numpy().copy() for k, v in model.state_dict().items()}


def training_checkpoint(online: dict[str, np.ndarray], ema: dict[str, np.ndarray]) -> dict:
    """A Lightning checkpoint of the reference trainer: online net, EMA copy, EMA buffers, AE."""
    state = {f"model.net.{k}": v for k, v in online.items()}
    state |= {f"ema_model.ema_model.net.{k}": v for k, v in ema.items()}
    state |= {"ema_model.initted": np.array(True), "ema_model.step": np.array(7),
              "first_stage.encoder.conv_in.weight": np.zeros((128, 3, 3, 3), np.float32)}
    return {"state_dict": state, "global_step": 7}


def leaf(params: Any, *path: str) -> np.ndarray:
    """The param at `path` of a params tree, as numpy."""
    for key in path:
        params = params[key]
    return np.asarray(params)
