"""Reading PyTorch checkpoints and filling Flax params trees from their state dicts.

`load_torch_state_dict` reads `.safetensors` or `.pt/.ckpt/.bin` files (without running the
pickled code: `safe_unpickle`);
`params_from_torch` maps a state dict onto a tree of param shapes through a layout function
(the UNet's or the VAE's), finding the network's prefix in training checkpoints and listing every
missing, unexpected and mis-shaped key; `save_params` writes the result with Orbax.
"""

from __future__ import annotations

import os
import re
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal

import numpy as np
from flax import traverse_util

from fmboost_jax import paths
from fmboost_jax.errors import UserError

Params = dict[str, Any]
Which = Literal["ema", "model"]
Layout = Callable[[tuple[str, ...], tuple[int, ...]],
                  tuple[str, tuple[int, ...], Callable[[np.ndarray], np.ndarray]]]

# Buffers of the reference EMA wrapper; they are not network weights.
NON_NETWORK_BUFFERS = frozenset({"initted", "step"})

class CheckpointMismatchError(UserError):
    """The state dict does not match the network: lists missing, unexpected and mis-shaped keys."""


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
        raise UserError(f"which must be 'ema', 'model' or None, got {which!r}")
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


def params_from_torch(state_dict: Mapping[str, Any], shapes: Params, layout: Layout,
                      which: Which | None = None,
                      ignore: Callable[[str], bool] = lambda key: False) -> Params:
    """Fills a Flax params tree of `jax.ShapeDtypeStruct`s from a PyTorch state dict.

    `layout(path, flax_shape) -> (torch key, torch shape, transform)` names the PyTorch
    counterpart of every Flax param (the UNet's or the VAE's); keys for which `ignore`
    is true (after the network's prefix) are dropped. Raises CheckpointMismatchError listing
    every missing, unexpected and mis-shaped key.
    """
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


def load_torch_state_dict(path: str | os.PathLike, allow_pickle: bool = False) -> dict[str, Any]:
    """Reads a `.safetensors` file, or a `.pt/.ckpt/.bin/.pth` file with `torch.load` through the
    restricted unpickler (`safe_unpickle`: tensors and containers load, any other object becomes
    an inert placeholder, nothing in the file runs), so Lightning checkpoints load as they are.

    `allow_pickle=True` unpickles with plain pickle, which runs code the file names: only for a
    file you made yourself.
    """
    path = os.fspath(path)
    if not paths.isfile(path):
        raise FileNotFoundError(f"checkpoint file not found: {path}")
    path = paths.local_copy(path)            # torch and safetensors read local files
    if path.endswith(".safetensors"):
        return _load_safetensors(path)
    try:
        import torch
    except ImportError as err:
        raise UserError(f"reading {path} needs PyTorch (`pip install torch`)") from err
    from fmboost_jax.convert import safe_unpickle
    restricted = {} if allow_pickle else {"pickle_module": safe_unpickle}
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=False, **restricted)
    except Exception as err:
        reason = (str(err).strip().splitlines() or [""])[0].split(". ")[0]
        raise UserError(f"{path} is not a readable PyTorch checkpoint ({type(err).__name__}: "
                         f"{reason}): a damaged or partial file, or another kind of file") from None
    if not isinstance(loaded, Mapping):
        raise UserError(f"{path} holds {loaded!r}, not a state dict: save `model.state_dict()`")
    return dict(loaded)


def _load_safetensors(path: str) -> dict[str, Any]:
    try:
        from safetensors.numpy import load_file
    except ImportError as err:
        raise UserError(f"reading {path} needs the `safetensors` package") from err
    try:
        return dict(load_file(path))
    except Exception as err:
        raise UserError(f"{path} is not a readable safetensors file: {err}") from None


def save_params(dst: str | os.PathLike, params: Params, overwrite: bool = False) -> str:
    """Writes `params` with orbax's StandardCheckpointer to the absolute path of `dst`."""
    import orbax.checkpoint as ocp

    dst = paths.resolve(dst)
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(dst, params, force=overwrite)
    checkpointer.wait_until_finished()
    return dst


