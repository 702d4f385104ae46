"""Command line: `python -m fmboost_jax.convert unet|vae|inception --src FILE --dst DIR ...`."""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from fmboost_jax import cli
from fmboost_jax import config as config_lib
from fmboost_jax.convert import __doc__ as DOC
from fmboost_jax.convert.inception import inception_params_from_torch
from fmboost_jax.convert.torch_io import load_torch_state_dict, save_params
from fmboost_jax.convert.unet import unet_params_from_torch
from fmboost_jax.convert.vae import vae_params_from_torch
from fmboost_jax.models import autoencoder
from fmboost_jax.models.autoencoder import AutoencoderKL
from fmboost_jax.models.layers import count_params
from fmboost_jax.models.unet import EfficientUNet


def _run_unet(args: argparse.Namespace) -> int:
    """`unet` subcommand: reference UNet checkpoint -> orbax params directory."""
    unet = EfficientUNet.from_config(config_lib.load_config(args.config).unet)
    state_dict = load_torch_state_dict(args.src, allow_pickle=args.allow_pickle)
    params = unet_params_from_torch(state_dict, unet, which=args.which)
    dst = save_params(args.dst, params, overwrite=args.overwrite)
    print(f"wrote {count_params(params):,} UNet parameters to {dst}")
    return 0


def _run_vae(args: argparse.Namespace) -> int:
    """`vae` subcommand: PyTorch VAE checkpoint (either layout) -> orbax params directory."""
    model = AutoencoderKL(autoencoder.preset(args.preset))
    state_dict = load_torch_state_dict(args.src, allow_pickle=args.allow_pickle)
    params = vae_params_from_torch(state_dict, model)
    dst = save_params(args.dst, params, overwrite=args.overwrite)
    print(f"wrote {count_params(params):,} VAE parameters ({args.preset}) to {dst}")
    return 0


def _run_inception(args: argparse.Namespace) -> int:
    """`inception` subcommand: pytorch-fid's FID Inception-v3 weights -> orbax variables directory."""
    state_dict = load_torch_state_dict(args.src, allow_pickle=args.allow_pickle)
    variables = inception_params_from_torch(state_dict)
    dst = save_params(args.dst, variables, overwrite=args.overwrite)
    print(f"wrote {count_params(variables['params']):,} FID Inception-v3 parameters and "
          f"{count_params(variables['batch_stats']):,} BatchNorm statistics to {dst}")
    return 0


def _add_common_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--src", required=True, help="PyTorch checkpoint (.ckpt/.pt/.bin/.safetensors)")
    parser.add_argument("--dst", required=True, help="output orbax checkpoint directory")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --dst")
    parser.add_argument("--allow_pickle", action="store_true",
                        help="plain pickle, which runs code the file names: only for files you made "
                             "(Lightning checkpoints load without it)")


def build_parser() -> argparse.ArgumentParser:
    """One subparser per network; each sets `func(args) -> exit code`."""
    parser = cli.parser("fmboost_jax.convert", DOC)
    commands = parser.add_subparsers(dest="command", required=True)

    unet = commands.add_parser("unet", help="convert the flow-matching EfficientUNet")
    _add_common_arguments(unet)
    unet.add_argument("--config", required=True,
                      help="config with the `unet` block: a file (file.py[:arg]) or a name (lhq)")
    unet.add_argument("--which", choices=("ema", "model"), default=None,
                      help="EMA or online weights of a training checkpoint (default: EMA if present)")
    unet.set_defaults(func=_run_unet)

    vae = commands.add_parser("vae", help="convert a KL-VAE (SD, SDXL, SD3, FLUX)")
    _add_common_arguments(vae)
    vae.add_argument("--preset", choices=sorted(autoencoder.PRESETS), default="sd",
                     help="architecture of the checkpoint (default: sd; sdxl has the same shapes)")
    vae.set_defaults(func=_run_vae)

    fid = commands.add_parser("inception", help="convert pytorch-fid's FID Inception-v3 "
                              "(pt_inception-2015-12-05-6726825d.pth)")
    _add_common_arguments(fid)
    fid.set_defaults(func=_run_inception)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    with cli.user_errors_in_one_line():
        return args.func(args)


def run() -> None:
    """Console script `fmboost-convert`."""
    cli.console(main)


if __name__ == "__main__":
    run()
