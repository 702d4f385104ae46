"""The object a notebook holds: a trained CFM upsampler with its first stage, ready to boost.

    up = fmboost_jax.load_upsampler("runs/demo")        # a training workdir
    out = up(lowres_images)                             # (B, h, w, 3) in [-1, 1] -> (B, 4h, 4w, 3)
    out.images, out.stats["nfe"]

`load_upsampler` reads a training workdir (its `config.json` and the EMA params of the latest
checkpoint) or a directory of converted params with a config, and loads the first stage's
weights (`vae=` overrides the config's path). Calls are jitted once per option set and input
shape, split the batch over the local devices, and take any input size the network can take.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from fmboost_jax import config as config_lib
from fmboost_jax import paths
from fmboost_jax.cfm import sampling
from fmboost_jax.cfm.model import CFM

PyTree = Any
CONFIG_FILE = "config.json"


@dataclasses.dataclass
class Upsampler:
    """A CFM model, its UNet params (EMA) and first-stage params; call it on low-res images."""
    cfm: CFM
    params: PyTree
    fs_params: PyTree
    config: ml_collections.ConfigDict
    _compiled: dict = dataclasses.field(default_factory=dict, repr=False)

    @property
    def upscale(self) -> int:
        return self.cfm.upscale

    def options(self, **overrides: Any) -> dict[str, Any]:
        """The sampler options: the config's `sampling` block with `overrides` (None: unset)."""
        options = sampling.solver_options(self.config.sampling)
        options.update({k: v for k, v in overrides.items() if v is not None})
        return options

    def _sample_fn(self, options: dict[str, Any]):
        key = tuple(sorted(options.items()))
        if key not in self._compiled:
            self._compiled[key] = sampling.make_sample_fn(self.cfm, **options)
        return self._compiled[key]

    def __call__(self, lowres_images: Any, rng: jax.Array | None = None, *,
                 solver: str | None = None, num_steps: int | None = None,
                 **options: Any) -> sampling.SampleOutput:
        """Low-res images (B, h, w, 3) in [-1, 1] -> `SampleOutput` with images
        (B, h * upscale, w * upscale, 3), latents and solver stats (NFE, steps)."""
        x = jnp.asarray(lowres_images, jnp.float32)
        if x.ndim != 4 or x.shape[-1] != 3:
            raise ValueError(f"low-res images must be (B, h, w, 3), got shape {x.shape}")
        self.cfm.latent_size((x.shape[1] * self.upscale, x.shape[2] * self.upscale))  # names a bad size
        opts = self.options(solver=solver, num_steps=num_steps, **options)
        rng = jax.random.PRNGKey(0) if rng is None else rng
        n = x.shape[0]
        x = _split_over_local_devices(x)
        out = self._sample_fn(opts)(self.params, self.fs_params, x, rng)
        return jax.tree.map(lambda a: a[:n] if _batched(a, x.shape[0]) else a, out)


def _batched(a: Any, batch: int) -> bool:
    return hasattr(a, "ndim") and a.ndim >= 1 and a.shape[0] == batch


def _split_over_local_devices(x: jax.Array) -> jax.Array:
    """The batch padded to a multiple of the local devices and split over them (one device:
    as it is)."""
    devices = jax.local_devices()
    if len(devices) == 1:
        return x
    pad = -x.shape[0] % len(devices)
    x = jnp.concatenate([x, jnp.repeat(x[-1:], pad, axis=0)]) if pad else x
    mesh = jax.sharding.Mesh(np.array(devices), ("batch",))
    return jax.device_put(x, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("batch")))


# ------------------------------------------------------------------------ loading
def read_run_config(workdir: str) -> ml_collections.ConfigDict:
    """The config a training run wrote to its workdir (`config.json`)."""
    path = os.path.join(paths.resolve(workdir), CONFIG_FILE)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{workdir!r} is not a training workdir: it has no {CONFIG_FILE}")
    with open(path) as f:
        return ml_collections.ConfigDict(json.load(f))


def _params(path: str, is_workdir: bool, cfm: CFM, step: int | None) -> PyTree:
    """EMA params of a workdir's latest (or given) checkpoint, or converted params."""
    from fmboost_jax.train import checkpointing
    if is_workdir:
        try:
            return checkpointing.restore_params(path, use_ema=True, step=step)
        except FileNotFoundError:
            raise FileNotFoundError(f"{path!r} holds no checkpoint yet: train it first "
                                    "(`python -m fmboost_jax.train ... --workdir=...`)") from None
    import orbax.checkpoint as ocp
    target = jax.eval_shape(cfm.init_params, jax.random.PRNGKey(0))
    return ocp.StandardCheckpointer().restore(paths.resolve(path), target)


def load_upsampler(path: str, config: Any = None, *, vae: str | None = None,
                   dtype: str | None = None, step: int | None = None) -> Upsampler:
    """An `Upsampler` from a training workdir, or from converted params (`python -m
    fmboost_jax.convert unet`) with `config` (a ConfigDict or a `load_config` spec).

    `vae` overrides `config.first_stage.checkpoint`; `dtype` ("float32", "bfloat16", "auto")
    the compute dtype of the UNet and the VAE; `step` picks a checkpoint (default: the latest).
    """
    if not os.path.isdir(paths.resolve(path)):
        raise FileNotFoundError(f"model {path!r} does not exist")
    is_workdir = os.path.exists(os.path.join(paths.resolve(path), CONFIG_FILE))
    if config is None:
        if not is_workdir:
            raise ValueError(f"{path!r} is not a training workdir (no {CONFIG_FILE}): pass the "
                             "config of the converted params (config=...)")
        config = read_run_config(path)
    elif isinstance(config, str):
        config = config_lib.load_config(config)
    config = config.copy_and_resolve_references()
    with config.unlocked():
        if vae is not None:
            config.first_stage.checkpoint = vae
        if dtype is not None:
            config.dtype = config.first_stage.dtype = dtype
    config_lib.validate(config)
    from fmboost_jax.train.setup import check_resources
    check_resources(_one_device(config))
    cfm = CFM.from_config(config)
    params = _params(path, is_workdir, cfm, step)
    fs_params = cfm.first_stage.init_params(jax.random.PRNGKey(0))
    return Upsampler(cfm, params, fs_params, config)


def _one_device(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """The config with a batch and mesh that any machine satisfies (inference checks the VAE
    checkpoint, not the training layout)."""
    c = config.copy_and_resolve_references()
    c.mesh, c.batch_size = (("data", -1), ("fsdp", 1)), jax.device_count()
    return c

