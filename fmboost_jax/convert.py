"""Conversion of reference PyTorch checkpoints into Flax params.

`unet_params_from_torch` maps a PyTorch state dict of the reference `EfficientUNet` onto the
params of `fmboost_jax.models.unet.EfficientUNet` (the tree that goes under `"params"` in
`unet.apply({"params": params}, x, t, context)`). The state dict may be bare, or a training
checkpoint holding the online network under `model.net.` and the EMA copy under
`ema_model.ema_model.net.`, optionally nested in a Lightning `{"state_dict": ...}`.

CLI (torch is only needed to read `.pt/.ckpt/.bin` files):

    python -m fmboost_jax.convert unet --src FILE --dst DIR --config configs/X.py [--which ema|model]
    python -m fmboost_jax.convert vae --src FILE --dst DIR [--preset sd|sdxl|sd3|flux]

`vae_params_from_torch` does the same for the Stable Diffusion family's KL autoencoder
(`fmboost_jax.models.autoencoder`), from the latent-diffusion or the diffusers key layout.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import re
import sys
from collections import Counter
from typing import Any, Callable, Literal, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from fmboost_jax.models import autoencoder
from fmboost_jax.models.autoencoder import AutoencoderKL
from fmboost_jax.models.unet import EfficientUNet, count_params, unet_from_config

Params = dict[str, Any]
Which = Literal["ema", "model"]
Layout = Callable[[tuple[str, ...], tuple[int, ...]],
                  tuple[str, tuple[int, ...], Callable[[np.ndarray], np.ndarray]]]

# Buffers of the reference EMA wrapper; they are not network weights.
NON_NETWORK_BUFFERS = frozenset({"initted", "step"})

# Flax module names whose PyTorch counterpart sits one attribute deeper.
_NESTED_MODULES = {"pool": "pool.down_conv", "un_pool": "un_pool.up_conv"}
# Flax Dense layers that are 1x1 Conv1d layers in PyTorch.
_CONV1D_DENSE = frozenset({"qkv", "proj_out"})


class CheckpointMismatchError(ValueError):
    """The state dict does not match the network: lists missing, unexpected and mis-shaped keys."""


def torch_module_name(flax_name: str) -> str:
    """`input_blocks_1_0` -> `input_blocks.1.0`; `pool` -> `pool.down_conv`."""
    if flax_name in _NESTED_MODULES:
        return _NESTED_MODULES[flax_name]
    return re.sub(r"_(\d+)(?=_|$)", r".\1", flax_name)


def torch_layout(path: tuple[str, ...], flax_shape: tuple[int, ...]
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


def _to_numpy(value: Any) -> np.ndarray:
    """torch.Tensor (any float dtype, any device) or array -> float32 numpy array."""
    if hasattr(value, "detach"):
        value = value.detach().cpu().float().numpy()
    return np.asarray(value, dtype=np.float32)


def _is_ema_prefix(prefix: str) -> bool:
    parts = prefix.split(".")
    return "ema_model" in parts and "online_model" not in parts


def _network_prefixes(keys: Sequence[str], expected: set[str]) -> Counter[str]:
    """Prefixes `P` with `P + k` in `keys` for an expected key `k`, counted by hits."""
    hits: Counter[str] = Counter()
    for key in keys:
        for i in [0] + [m.end() for m in re.finditer(r"\.", key)]:
            if key[i:] in expected:
                hits[key[:i]] += 1
    return hits


def select_network(state_dict: Mapping[str, Any], expected: set[str],
                   which: Which | None = None) -> tuple[str, dict[str, Any]]:
    """Picks the network's keys out of a checkpoint -> (prefix, {unprefixed key: value}).

    Unwraps a nested `state_dict`; finds prefixes under which the network's keys live
    (`""`, `model.net.`, `ema_model.ema_model.net.`, ...); `which` chooses the EMA copy
    (`ema`) or the online one (`model`); None prefers the EMA copy when present.
    """
    if isinstance(state_dict.get("state_dict"), Mapping):
        state_dict = state_dict["state_dict"]
    if which not in (None, "ema", "model"):
        raise ValueError(f"which must be 'ema', 'model' or None, got {which!r}")
    hits = _network_prefixes(list(state_dict), expected)
    # Copies of the network; prefixes with a few stray matches are not.
    top = max(hits.values(), default=0)
    hits = Counter({p: n for p, n in hits.items() if 2 * n >= top})
    ema = {p: n for p, n in hits.items() if _is_ema_prefix(p)}
    online = {p: n for p, n in hits.items() if not _is_ema_prefix(p)}
    if which == "ema" and not ema:
        raise CheckpointMismatchError(f"which='ema' but the checkpoint holds no EMA copy of the "
                                      f"network (network prefixes found: {sorted(hits)})")
    if which == "model" and not online:
        raise CheckpointMismatchError(f"which='model' but the checkpoint holds only EMA copies of "
                                      f"the network (network prefixes found: {sorted(hits)})")
    pool = ema if which == "ema" or (which is None and ema) else online
    prefix = max(pool, key=lambda p: (pool[p], -len(p))) if pool else ""
    others = [p for p in hits if p != prefix and p.startswith(prefix)]
    selected = {k[len(prefix):]: v for k, v in state_dict.items()
                if k.startswith(prefix) and not any(k.startswith(p) for p in others)}
    return prefix, selected


def params_from_torch(state_dict: Mapping[str, Any], shapes: Params,
                      which: Which | None = None, layout: Layout | None = None,
                      ignore: Callable[[str], bool] = lambda key: False) -> Params:
    """Fills a Flax params tree of `jax.ShapeDtypeStruct`s from a PyTorch state dict.

    `layout(path, flax_shape) -> (torch key, torch shape, transform)` names the PyTorch
    counterpart of every Flax param (default: the reference UNet's); keys for which `ignore`
    is true (after the network's prefix) are dropped. Raises CheckpointMismatchError listing
    every missing, unexpected and mis-shaped key.
    """
    layout = layout or torch_layout
    flat_shapes = traverse_util.flatten_dict(shapes)
    layouts = {path: layout(path, tuple(s.shape)) for path, s in flat_shapes.items()}
    expected = {key for key, _, _ in layouts.values()}
    prefix, net = select_network(state_dict, expected, which)
    net = {k: v for k, v in net.items() if not ignore(k)}

    missing, bad_shape, flat = [], [], {}
    for path, (key, torch_shape, to_flax) in layouts.items():
        if key not in net:
            missing.append(prefix + key)
            continue
        value = _to_numpy(net[key])
        if value.shape != torch_shape:
            bad_shape.append(f"{prefix + key}: checkpoint {value.shape}, expected {torch_shape}")
            continue
        flat[path] = np.ascontiguousarray(to_flax(value))
    unexpected = [prefix + k for k in net
                  if k not in expected and k.rsplit(".", 1)[-1] not in NON_NETWORK_BUFFERS]
    if missing or unexpected or bad_shape:
        lines = [f"checkpoint does not match the network (prefix {prefix!r}):"]
        for title, items in (("missing keys", missing), ("unexpected keys", unexpected),
                             ("wrong shapes", bad_shape)):
            if items:
                lines += [f"  {title} ({len(items)}):"] + [f"    {item}" for item in sorted(items)]
        raise CheckpointMismatchError("\n".join(lines))
    return traverse_util.unflatten_dict(flat)


def default_input_shape(unet: EfficientUNet) -> tuple[int, int, int, int]:
    """Smallest (1, H, W, in_channels) input the UNet accepts."""
    side = 2 ** (len(unet.channel_mult) - 1) * max(unet.pool_factor, 1)
    return (1, side, side, unet.in_channels)


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
    return params_from_torch(state_dict, unet_param_shapes(unet, input_shape), which)


# ------------------------------------------------------------------------ the SD VAE
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
    return params_from_torch(renamed, autoencoder.param_shapes(model), layout=vae_layout,
                             ignore=_is_training_loss_key)


def load_torch_state_dict(path: str | os.PathLike, allow_pickle: bool = False) -> dict[str, Any]:
    """Reads a `.safetensors` file, or a `.pt/.ckpt/.bin` file via `torch.load(weights_only=True)`.

    `allow_pickle=True` unpickles arbitrary objects (`weights_only=False`); only for trusted files.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint file not found: {path}")
    if path.endswith(".safetensors"):
        try:
            from safetensors.numpy import load_file
        except ImportError as err:
            raise ImportError(f"reading {path} needs the `safetensors` package") from err
        try:
            return dict(load_file(path))
        except Exception as err:
            raise ValueError(f"{path} is not a readable safetensors file: {err}") from err
    try:
        import torch
    except ImportError as err:
        raise ImportError(f"reading {path} needs PyTorch (`pip install torch`)") from err
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=not allow_pickle)
    except Exception as err:
        hint = ""
        if not allow_pickle and "Weights only load failed" in str(err):
            hint = (" with weights_only=True (it holds Python objects besides tensors; if the file is "
                    "trusted, allow_pickle=True / --allow-pickle reads it)")
        reason = (str(err).strip().splitlines() or [""])[0]
        raise ValueError(f"{path} is not a readable PyTorch checkpoint{hint}: "
                         f"{type(err).__name__}: {reason}") from err
    if not isinstance(loaded, Mapping):
        raise ValueError(f"{path} holds a {type(loaded).__name__}, not a state dict")
    return dict(loaded)


def load_config(spec: str) -> Any:
    """`path/to/config.py[:arg]` -> the module's `get_config([arg])` (an ml_collections ConfigDict)."""
    path, _, arg = spec.partition(":")
    module_spec = importlib.util.spec_from_file_location("_fmboost_convert_config", path)
    if module_spec is None or module_spec.loader is None or not os.path.isfile(path):
        raise FileNotFoundError(f"config file not found: {path}")
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module.get_config(arg) if arg else module.get_config()


def save_params(dst: str | os.PathLike, params: Params, overwrite: bool = False) -> str:
    """Writes `params` with orbax's StandardCheckpointer to the absolute path of `dst`."""
    import orbax.checkpoint as ocp

    dst = os.path.abspath(os.fspath(dst))
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(dst, params, force=overwrite)
    checkpointer.wait_until_finished()
    return dst


def _run_unet(args: argparse.Namespace) -> int:
    """`unet` subcommand: reference UNet checkpoint -> orbax params directory."""
    config = load_config(args.config)
    unet = unet_from_config(config.unet)
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


def _add_common_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--src", required=True, help="PyTorch checkpoint (.ckpt/.pt/.bin/.safetensors)")
    parser.add_argument("--dst", required=True, help="output orbax checkpoint directory")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --dst")
    parser.add_argument("--allow-pickle", action="store_true",
                        help="torch.load with weights_only=False (trusted files only)")


def build_parser() -> argparse.ArgumentParser:
    """One subparser per network; each sets `func(args) -> exit code`."""
    parser = argparse.ArgumentParser(prog="python -m fmboost_jax.convert", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)

    unet = commands.add_parser("unet", help="convert the flow-matching EfficientUNet")
    _add_common_arguments(unet)
    unet.add_argument("--config", required=True, help="ml_collections config file with `config.unet`")
    unet.add_argument("--which", choices=("ema", "model"), default=None,
                      help="EMA or online weights of a training checkpoint (default: EMA if present)")
    unet.set_defaults(func=_run_unet)

    vae = commands.add_parser("vae", help="convert a KL-VAE (SD, SDXL, SD3, FLUX)")
    _add_common_arguments(vae)
    vae.add_argument("--preset", choices=sorted(autoencoder.PRESETS), default="sd",
                     help="architecture of the checkpoint (default: sd; sdxl has the same shapes)")
    vae.set_defaults(func=_run_vae)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
