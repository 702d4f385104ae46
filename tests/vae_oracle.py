"""A PyTorch oracle of the VAE: diffusers' AutoencoderKL with random weights, a real photo, and
the latent-diffusion key layout, shared by the VAE's tests."""

import re

import diffusers
import jax
import jax.numpy as jnp
import numpy as np
import skimage.data
import torch

from fmboost_jax.data.images import to_float
from fmboost_jax.models import autoencoder as ae

SD_WIDTHS = (128, 256, 512, 512)


def torch_vae(widths=SD_WIDTHS, latent=4, quant=True, layers=2, seed=0):
    torch.manual_seed(seed)
    n = len(widths)
    return diffusers.AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * n,
        up_block_types=("UpDecoderBlock2D",) * n, block_out_channels=widths,
        layers_per_block=layers, latent_channels=latent, norm_num_groups=32,
        use_quant_conv=quant, use_post_quant_conv=quant).eval()


def photo(size=64) -> np.ndarray:
    """A (1, size, size, 3) crop of a real photo in [-1, 1]: the astronaut's face."""
    return to_float(skimage.data.astronaut()[80:80 + size, 200:200 + size])[None]


def torch_outputs(model, x: np.ndarray):
    """(mean, logvar, decode(mean)) of the PyTorch model, NHWC numpy."""
    nhwc = lambda t: t.detach().numpy().transpose(0, 2, 3, 1)
    with torch.no_grad():
        post = model.encode(torch.from_numpy(x.transpose(0, 3, 1, 2).copy())).latent_dist
        image = model.decode(post.mean).sample
    return nhwc(post.mean), nhwc(post.logvar), nhwc(image)


def flax_outputs(model: ae.AutoencoderKL, params, x: np.ndarray, mean_t: np.ndarray):
    enc = jax.jit(lambda p, x: model.apply({"params": p}, x, method=model.encode))
    dec = jax.jit(lambda p, z: model.apply({"params": p}, z, method=model.decode))
    mean, logvar = enc(params, jnp.asarray(x))
    return np.asarray(mean), np.asarray(logvar), np.asarray(dec(params, jnp.asarray(mean_t)))


def ldm_state_dict(diffusers_sd: dict, num_levels: int) -> dict:
    """The same weights under latent diffusion's key names (as in `sd_ae.ckpt`)."""
    out = {}
    for key, value in diffusers_sd.items():
        k = re.sub(r"encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.", r"encoder.down.\1.block.\2.", key)
        k = re.sub(r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.", r"encoder.down.\1.downsample.", k)
        k = re.sub(r"decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.",
                   lambda m: f"decoder.up.{num_levels - 1 - int(m[1])}.block.{m[2]}.", k)
        k = re.sub(r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.",
                   lambda m: f"decoder.up.{num_levels - 1 - int(m[1])}.upsample.", k)
        k = k.replace("mid_block.resnets.0.", "mid.block_1.").replace("mid_block.resnets.1.", "mid.block_2.")
        for new, old in (("group_norm", "norm"), ("to_q", "q"), ("to_k", "k"), ("to_v", "v"),
                         ("to_out.0", "proj_out")):
            k = k.replace(f"mid_block.attentions.0.{new}.", f"mid.attn_1.{old}.")
        k = k.replace("conv_norm_out", "norm_out").replace("conv_shortcut", "nin_shortcut")
        if ".attn_1." in k and k.endswith("weight") and value.ndim == 2:
            value = value[:, :, None, None]                     # 1x1 convs in latent diffusion
        out[k] = value
    return out


def assert_parity(ours, theirs, tol=1e-4):
    for name, a, b in zip(("mean", "logvar", "decoded"), ours, theirs):
        assert a.shape == b.shape, name
        assert np.abs(a - b).max() <= tol, (name, float(np.abs(a - b).max()))
