"""A PyTorch KL-VAE state dict (latent-diffusion or diffusers layout) -> params of
`models/autoencoder.py`."""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from fmboost_jax.convert.torch_io import Params, params_from_torch
from fmboost_jax.models import autoencoder
from fmboost_jax.models.autoencoder import AutoencoderKL


def vae_torch_key(path: tuple[str, ...]) -> str:
    """Flax path -> diffusers key: `('encoder', 'down_blocks_0_resnets_1', 'conv1', 'kernel')`
    -> `encoder.down_blocks.0.resnets.1.conv1.weight`."""
    *modules, leaf = path
    names = [re.sub(r"_(\d+)(?=_|$)", r".\1", m).replace("._", ".") for m in modules]
    names = [re.sub(r"\.(\d+)_", r".\1.", n) for n in names]
    return ".".join(names + ["bias" if leaf == "bias" else "weight"])


def vae_layout(path: tuple[str, ...], flax_shape: tuple[int, ...]
               ) -> tuple[str, tuple[int, ...], Callable[[np.ndarray], np.ndarray]]:
    """Flax VAE param -> (diffusers key, torch shape, torch-to-flax transform)."""
    key, s = vae_torch_key(path), flax_shape
    if path[-1] != "kernel":
        return key, s, lambda w: w
    if len(s) == 4:  # Conv2d (O, I, kh, kw) -> (kh, kw, I, O)
        return key, (s[3], s[2], s[0], s[1]), lambda w: w.transpose(2, 3, 1, 0)
    return key, (s[1], s[0]), lambda w: w.T  # Linear (O, I) -> (I, O)


# Latent-diffusion (`sd_ae.ckpt`) and legacy diffusers names -> current diffusers names.
_LDM_RENAMES = [
    (r"(encoder|decoder)\.mid\.block_1\.", r"\1.mid_block.resnets.0."),
    (r"(encoder|decoder)\.mid\.block_2\.", r"\1.mid_block.resnets.1."),
    (r"(encoder|decoder)\.mid\.attn_1\.norm\.", r"\1.mid_block.attentions.0.group_norm."),
    (r"(encoder|decoder)\.mid\.attn_1\.q\.", r"\1.mid_block.attentions.0.to_q."),
    (r"(encoder|decoder)\.mid\.attn_1\.k\.", r"\1.mid_block.attentions.0.to_k."),
    (r"(encoder|decoder)\.mid\.attn_1\.v\.", r"\1.mid_block.attentions.0.to_v."),
    (r"(encoder|decoder)\.mid\.attn_1\.proj_out\.", r"\1.mid_block.attentions.0.to_out.0."),
    (r"encoder\.down\.(\d+)\.block\.(\d+)\.", r"encoder.down_blocks.\1.resnets.\2."),
    (r"encoder\.down\.(\d+)\.downsample\.", r"encoder.down_blocks.\1.downsamplers.0."),
    (r"(encoder|decoder)\.norm_out\.", r"\1.conv_norm_out."),
    (r"\.nin_shortcut\.", r".conv_shortcut."),
    (r"\.attentions\.0\.query\.", r".attentions.0.to_q."),
    (r"\.attentions\.0\.key\.", r".attentions.0.to_k."),
    (r"\.attentions\.0\.value\.", r".attentions.0.to_v."),
    (r"\.attentions\.0\.proj_attn\.", r".attentions.0.to_out.0."),
]


def diffusers_vae_keys(state_dict: Mapping[str, Any], num_levels: int) -> dict[str, Any]:
    """Renames a VAE state dict of either layout (any prefix kept) to diffusers' names.

    The latent-diffusion decoder numbers its levels from the shallowest (`decoder.up.3` is
    the deepest of 4), diffusers from the deepest (`decoder.up_blocks.0`). Attention weights
    stored as 1x1 convs (C, C, 1, 1) become (C, C) linear weights.
    """
    if isinstance(state_dict.get("state_dict"), Mapping):
        state_dict = state_dict["state_dict"]
    up = lambda m: f"decoder.up_blocks.{num_levels - 1 - int(m.group(1))}."
    out = {}
    for key, value in state_dict.items():
        new = re.sub(r"decoder\.up\.(\d+)\.block\.(\d+)\.",
                     lambda m: up(m) + f"resnets.{m.group(2)}.", key)
        new = re.sub(r"decoder\.up\.(\d+)\.upsample\.", lambda m: up(m) + "upsamplers.0.", new)
        for pattern, repl in _LDM_RENAMES:
            new = re.sub(pattern, repl, new)
        if ".attentions.0.to_" in new and new.endswith("weight") and len(value.shape) == 4:
            value = value[:, :, 0, 0]
        out[new] = value
    return out


def _is_training_loss_key(key: str) -> bool:
    return key.startswith("loss.")  # the discriminator and LPIPS of the VAE's training


def vae_params_from_torch(state_dict: Mapping[str, Any], model: AutoencoderKL) -> Params:
    """A PyTorch `AutoencoderKL` state dict -> Flax params (float32 numpy) for `model`.

    Accepts the latent-diffusion layout (`sd_ae.ckpt`: bare, inside `state_dict`, or under
    `first_stage_model.` / `vae.`; `loss.*` keys dropped) and the diffusers layout (current or
    legacy attention names). Raises CheckpointMismatchError listing missing, unexpected and
    mis-shaped keys, e.g. for a 16-channel VAE read with a 4-channel preset.
    """
    renamed = diffusers_vae_keys(state_dict, len(model.config.ch_mult))
    return params_from_torch(renamed, autoencoder.param_shapes(model), vae_layout,
                             ignore=_is_training_loss_key)


