"""Conversion of reference PyTorch checkpoints into Flax params.

`unet_params_from_torch` maps a PyTorch state dict of the reference `EfficientUNet` onto the
params of `fmboost_jax.models.unet.EfficientUNet` (the tree that goes under `"params"` in
`unet.apply({"params": params}, x, t, context)`). The state dict may be bare, or a training
checkpoint holding the online network under `model.net.` and the EMA copy under
`ema_model.ema_model.net.`, optionally nested in a Lightning `{"state_dict": ...}`.

CLI (torch is only needed to read `.pt/.ckpt/.bin` files):

    python -m fmboost_jax.convert unet --src FILE --dst DIR --config configs/X.py [--which ema|model]
    python -m fmboost_jax.convert vae --src FILE --dst DIR [--preset sd|sdxl|sd3|flux]
    python -m fmboost_jax.convert inception --src pt_inception-2015-12-05-6726825d.pth --dst DIR

`vae_params_from_torch` does the same for the Stable Diffusion family's KL autoencoder
(`fmboost_jax.models.autoencoder`), from the latent-diffusion or the diffusers key layout;
`inception_params_from_torch` for pytorch-fid's FID Inception-v3 (`fmboost_jax.models.inception`,
read back with `fmboost_jax.models.inception.load_inception`).
"""

from fmboost_jax.convert.inception import inception_layout, inception_params_from_torch
from fmboost_jax.convert.torch_io import (
                                          CheckpointMismatchError,
                                          load_torch_state_dict,
                                          params_from_torch,
                                          save_params,
                                          select_network,
)
from fmboost_jax.convert.unet import unet_layout, unet_param_shapes, unet_params_from_torch
from fmboost_jax.convert.vae import diffusers_vae_keys, vae_params_from_torch

__all__ = ["CheckpointMismatchError", "diffusers_vae_keys", "inception_layout",
           "inception_params_from_torch", "load_torch_state_dict",
           "params_from_torch", "save_params", "select_network", "unet_param_shapes",
           "unet_layout", "unet_params_from_torch", "vae_params_from_torch"]
