"""The reference EfficientUNet's PyTorch state dict -> params of `models/unet.py`."""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from fmboost_jax.convert.torch_io import Params, Which, params_from_torch
from fmboost_jax.models.unet import EfficientUNet

# Flax module names whose PyTorch counterpart sits one attribute deeper.
_NESTED_MODULES = {"pool": "pool.down_conv", "un_pool": "un_pool.up_conv"}
# Flax Dense layers that are 1x1 Conv1d layers in PyTorch.
_CONV1D_DENSE = frozenset({"qkv", "proj_out"})


def torch_module_name(flax_name: str) -> str:
    """`input_blocks_1_0` -> `input_blocks.1.0`; `pool` -> `pool.down_conv`."""
    if flax_name in _NESTED_MODULES:
        return _NESTED_MODULES[flax_name]
    return re.sub(r"_(\d+)(?=_|$)", r".\1", flax_name)


def unet_layout(path: tuple[str, ...], flax_shape: tuple[int, ...]
                 ) -> tuple[str, tuple[int, ...], Callable[[np.ndarray], np.ndarray]]:
    """Flax param path and shape -> (torch key, torch shape, torch-to-flax array transform)."""
    *modules, leaf = path
    key = ".".join([torch_module_name(m) for m in modules] + ["bias" if leaf == "bias" else "weight"])
    s = flax_shape
    if leaf != "kernel":  # bias, GroupNorm scale: (C,)
        return key, s, lambda w: w
    if len(s) == 4 and modules[-1] == "un_pool":  # ConvTranspose2d (I, O, f, f) -> (f, f, I, O)
        return key, (s[2], s[3], s[0], s[1]), lambda w: w.transpose(2, 3, 0, 1)
    if len(s) == 4:  # Conv2d (O, I, kh, kw) -> (kh, kw, I, O)
        return key, (s[3], s[2], s[0], s[1]), lambda w: w.transpose(2, 3, 1, 0)
    if modules[-1] in _CONV1D_DENSE:  # Conv1d 1x1 (O, I, 1) -> (I, O)
        return key, (s[1], s[0], 1), lambda w: w[:, :, 0].T
    return key, (s[1], s[0]), lambda w: w.T  # Linear (O, I) -> (I, O)


def default_input_shape(unet: EfficientUNet) -> tuple[int, int, int, int]:
    """Smallest (1, H, W, in_channels) input the UNet accepts."""
    return (1, unet.downsampling, unet.downsampling, unet.in_channels)


def unet_param_shapes(unet: EfficientUNet, input_shape: Sequence[int] | None = None) -> Params:
    """The UNet's params as a tree of `jax.ShapeDtypeStruct` (nothing is computed)."""
    shape = tuple(input_shape or default_input_shape(unet))
    x = jax.ShapeDtypeStruct(shape, jnp.float32)
    t = jax.ShapeDtypeStruct(shape[:1], jnp.float32)
    return jax.eval_shape(unet.init, jax.random.key(0), x, t)["params"]


def unet_params_from_torch(state_dict: Mapping[str, Any], unet: EfficientUNet,
                           input_shape: Sequence[int] | None = None,
                           which: Which | None = None) -> Params:
    """Reference UNet state dict -> Flax params (float32 numpy) for `unet.apply({"params": ...})`.

    Args:
      state_dict: torch tensors or arrays; bare keys, or a training checkpoint (`model.net.`,
        `ema_model.ema_model.net.`), optionally nested under `"state_dict"`.
      unet: the Flax module with the checkpoint's hyperparameters.
      input_shape: (1, H, W, in_channels) for tracing the init; defaults to the smallest valid one.
      which: `"ema"` or `"model"` to choose between the EMA and online copies; None prefers EMA.
    """
    return params_from_torch(state_dict, unet_param_shapes(unet, input_shape), unet_layout, which)


