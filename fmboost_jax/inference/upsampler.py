"""The object a notebook holds: a trained CFM upsampler with its first stage, ready to boost.

    up = fmboost_jax.load_upsampler("runs/demo")        # a training workdir
    out = up(lowres_images)                             # (B, h, w, 3) in [-1, 1] -> (B, 4h, 4w, 3)
    out.images, out.stats["nfe"]

`load_upsampler` reads a training workdir (its `config.json` and the EMA params of the latest
checkpoint) or a directory of converted params with a config, and loads the first stage's
weights (`vae=` overrides the config's path). Calls are compiled once per option set and input
shape, split the batch over the local devices, and take any input size the network can take; a
boost whose compiled program needs more memory than the devices have free is refused before it
runs (`memory.TooLarge`, naming the batch size that fits).
"""

from __future__ import annotations

import dataclasses
import json
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from fmboost_jax import compile_cache, first_stage, paths
from fmboost_jax import config as config_lib
from fmboost_jax.cfm import model as cfm_model
from fmboost_jax.cfm import sampling
from fmboost_jax.cfm.model import CFM
from fmboost_jax.cfm.upsampling import resize
from fmboost_jax.checkpoints import store
from fmboost_jax.errors import UserError
from fmboost_jax.inference import memory

PyTree = Any
_CALL_OPTIONS = ("save_intermediates", "per_sample", "throw")   # of a call, not of the config


@dataclasses.dataclass
class Upsampler:
    """A CFM model, its UNet params (EMA) and first-stage params; call it on low-res images."""
    cfm: CFM
    params: PyTree
    fs_params: PyTree
    config: ml_collections.ConfigDict
    memory_limit: int | None = None    # bytes per device a boost may use (None: what is free)
    batch_size: int = 1                # smaller batches are padded to it: one program for all
    step: int | None = None            # the training step of the params (None: unknown)
    compile_seconds: float = 0.0       # of the last call: 0.0 when its program was compiled before
    _compiled: dict = dataclasses.field(default_factory=dict, repr=False)

    def __post_init__(self):
        # Replicated over the local devices, which the batch is split over.
        replicated = jax.sharding.NamedSharding(_local_mesh(), jax.sharding.PartitionSpec())
        self.params, self.fs_params = jax.device_put((self.params, self.fs_params), replicated)

    @property
    def upscale(self) -> int:
        return self.cfm.upscale

    def options(self, **overrides: Any) -> dict[str, Any]:
        """The sampler options: the config's `sampling` block with `overrides` (None: unset);
        `ConfigError` names a field the model cannot sample with (e.g. an SDE solver for a
        model whose source has no noise). A regression model takes one pass and no solver: its
        options are the call options alone (any solver setting is checked, then unused)."""
        options = sampling.solver_options(self.config.sampling)
        unknown = sorted(set(overrides) - set(options) - set(_CALL_OPTIONS))
        if unknown:
            raise UserError(f"unknown sampler option(s) {', '.join(unknown)}; valid: "
                             f"{', '.join((*options, *_CALL_OPTIONS))}")
        options.update({k: v for k, v in overrides.items() if v is not None})
        config = self.config.copy_and_resolve_references()
        with config.unlocked():
            config.sampling.update({k: v for k, v in options.items() if k in config.sampling})
        sampling.check_config(config)
        if self.cfm.objective == "regression":
            return {k: v for k, v in options.items() if k in _CALL_OPTIONS}
        return options

    def output_size(self, h: int, w: int) -> tuple[int, int]:
        """The output size in pixels of an (h, w) input image; raises ValueError naming the sizes
        when the network cannot take it."""
        size = (h * self.upscale, w * self.upscale)
        self.cfm.latent_size(size)
        return size

    def downsample(self, images: Any) -> jax.Array:
        """Ground truth (B, H, W, 3) -> the low-res input (B, H / upscale, W / upscale, 3), made
        as in training (the config's down-sampling and anti-aliasing)."""
        return self.cfm.lowres_images(jnp.asarray(images, jnp.float32))

    def _run(self, x: jax.Array, rng: jax.Array | None, latents: bool,
             options: dict[str, Any]) -> sampling.SampleOutput:
        """The sampler of (`latents`, `options`) compiled for `x`'s shape, checked to fit the
        devices' memory (`memory.TooLarge` otherwise) and run split over the local devices."""
        rng = jax.random.PRNGKey(0) if rng is None else rng
        n, x = x.shape[0], _split_over_local_devices(x, self.batch_size)
        key = (latents, *sorted(options.items()), x.shape)
        self.compile_seconds = 0.0
        if key not in self._compiled:
            start = time.perf_counter()
            fn = sampling.make_sample_fn(self.cfm, latents=latents, **options)
            compiled = fn.lower(self.params, self.fs_params, x, rng).compile()
            devices = jax.local_device_count()
            memory.check_fits(compiled, x.shape[0] // devices, devices, self.memory_limit)
            self._compiled[key] = compiled
            self.compile_seconds = time.perf_counter() - start
        out = self._compiled[key](self.params, self.fs_params, x, rng)
        rows = lambda a: None if a is None else a[:n]           # drop the padding rows
        return out._replace(images=rows(out.images), latents=rows(out.latents),
                            stats={k: v if v.ndim == 0 else v[:n] for k, v in out.stats.items()},
                            intermediates=None if out.intermediates is None
                            else out.intermediates[:, :n])

    def __call__(self, lowres_images: Any, rng: jax.Array | None = None, *,
                 solver: str | None = None, num_steps: int | None = None,
                 **options: Any) -> sampling.SampleOutput:
        """Low-res images (B, h, w, 3) in [-1, 1] -> `SampleOutput` with images
        (B, h * upscale, w * upscale, 3), latents and solver stats (NFE, steps)."""
        x = jnp.asarray(lowres_images, jnp.float32)
        if x.ndim != 4 or x.shape[-1] != 3:
            raise UserError(f"low-res images must be (B, h, w, 3), got shape {x.shape}")
        self.output_size(x.shape[1], x.shape[2])                   # names a bad size
        return self._run(x, rng, False, self.options(solver=solver, num_steps=num_steps, **options))

    def from_latents(self, lowres_latents: Any, rng: jax.Array | None = None, *,
                     decode: bool = True, solver: str | None = None, num_steps: int | None = None,
                     **options: Any) -> sampling.SampleOutput:
        """A diffusion model's low-res latents (B, h, w, C), scaled as it emits them (SD:
        `vae.config.scaling_factor` applied) -> latents (B, h * upscale, w * upscale, C) and, with
        `decode`, the images; PSU decodes, up-samples in pixel space and re-encodes."""
        z = jnp.asarray(lowres_latents, jnp.float32)
        c = self.cfm.first_stage.latent_channels
        if z.ndim != 4 or z.shape[-1] != c:
            raise UserError(f"latents must be (B, h, w, {c}) for this model's first stage, got "
                             f"shape {z.shape}")
        f = self.cfm.first_stage.downsample_factor
        self.cfm.latent_size((z.shape[1] * f * self.upscale, z.shape[2] * f * self.upscale))
        opts = self.options(solver=solver, num_steps=num_steps, **options)
        return self._run(z, rng, True, {**opts, "decode": decode})


@dataclasses.dataclass
class Cascade:
    """Upsamplers run back to back in latent space (e.g. 128² px -> 512² -> 2048²): each stage
    takes the latents of the one before; every stage's output is returned."""
    stages: list[Upsampler]

    def __post_init__(self):
        if not self.stages:
            raise UserError("a cascade needs at least one stage")
        spaces = [_latent_space(s) for s in self.stages]
        for i in range(1, len(spaces)):
            if spaces[i] != spaces[0]:
                raise UserError(f"cascade stage {i} works in another latent space than stage 0 "
                                 f"({spaces[i]} vs {spaces[0]}): the stages must share the VAE")

    @property
    def upscale(self) -> int:
        return int(np.prod([s.upscale for s in self.stages]))

    def output_size(self, h: int, w: int) -> tuple[int, int]:
        """The last stage's output size in pixels of an (h, w) input; ValueError if a stage
        cannot take its input."""
        for stage in self.stages:
            h, w = stage.output_size(h, w)
        return h, w

    def downsample(self, images: Any) -> jax.Array:
        """Ground truth (B, H, W, 3) -> the low-res input of the first stage, made as it was in
        training but by the whole cascade's factor."""
        cfm = self.stages[0].cfm
        size = (images.shape[1] // self.upscale, images.shape[2] // self.upscale)
        return resize(jnp.asarray(images, jnp.float32), size, cfm.lowres_downsampling,
                      cfm.lowres_antialias)

    def __call__(self, lowres_images: Any, rng: jax.Array | None = None, *,
                 decode_all: bool = True, **options: Any) -> list[sampling.SampleOutput]:
        """Low-res images -> one `SampleOutput` per stage (images of each, when `decode_all`;
        the last stage's always)."""
        rng = jax.random.PRNGKey(0) if rng is None else rng
        first = self.stages[0](lowres_images, jax.random.fold_in(rng, 0), **options)
        return [first, *self._rest(first.latents, rng, decode_all, options)]

    def from_latents(self, lowres_latents: Any, rng: jax.Array | None = None, *,
                     decode_all: bool = True, **options: Any) -> list[sampling.SampleOutput]:
        """A diffusion model's low-res latents -> one `SampleOutput` per stage."""
        rng = jax.random.PRNGKey(0) if rng is None else rng
        first = self.stages[0].from_latents(lowres_latents, jax.random.fold_in(rng, 0),
                                            decode=decode_all or len(self.stages) == 1, **options)
        return [first, *self._rest(first.latents, rng, decode_all, options)]

    def _rest(self, latents: jax.Array, rng: jax.Array, decode_all: bool,
              options: dict[str, Any]) -> list[sampling.SampleOutput]:
        outs = []
        for i, stage in enumerate(self.stages[1:], start=1):
            last = i == len(self.stages) - 1
            outs.append(stage.from_latents(latents, jax.random.fold_in(rng, i),
                                           decode=decode_all or last, **options))
            latents = outs[-1].latents
        return outs


def largest_output(model: Upsampler | Cascade, height: int, width: int) -> tuple[int, int]:
    """The largest output size (H, W) <= (height, width) in pixels that `model` makes (0 where no
    size fits): ground truth is cropped to it before it is down-sampled."""
    def fits(side: int) -> bool:
        try:
            model.output_size(side, side)       # the rules are the same along both axes
        except ValueError:
            return False
        return True
    side = lambda n: next((s for s in range(n // model.upscale, 0, -1) if fits(s)), 0)
    return side(height) * model.upscale, side(width) * model.upscale


def _latent_space(up: Upsampler) -> Any:
    """What a stage's latents mean: the first stage's kind and its autoencoder config."""
    fs = up.cfm.first_stage
    return (type(fs).__name__, getattr(fs, "config", None))


def _local_mesh() -> jax.sharding.Mesh:
    return jax.sharding.Mesh(np.array(jax.local_devices()), ("batch",))


def _split_over_local_devices(x: jax.Array, rows: int = 1) -> jax.Array:
    """The batch padded (with copies of its last row) to at least `rows` rows and a multiple of
    the local devices, and split over them."""
    pad = -max(x.shape[0], rows) % jax.local_device_count() + max(rows - x.shape[0], 0)
    x = jnp.concatenate([x, jnp.repeat(x[-1:], pad, axis=0)]) if pad else x
    sharding = jax.sharding.NamedSharding(_local_mesh(), jax.sharding.PartitionSpec("batch"))
    return jax.device_put(x, sharding)


# ------------------------------------------------------------------------ loading
def read_run_config(workdir: str) -> ml_collections.ConfigDict:
    """The config a training run wrote to its workdir (`config.json`)."""
    path = paths.join(workdir, store.CONFIG_FILE)
    if not paths.exists(path):
        raise FileNotFoundError(f"{workdir!r} is not a training workdir: it has no {store.CONFIG_FILE}")
    return config_lib.with_defaults(ml_collections.ConfigDict(json.loads(paths.read_text(path))))


def _params(path: str, is_workdir: bool, cfm: CFM, step: int | None
            ) -> tuple[PyTree, int | None]:
    """EMA params of a workdir's latest usable (or given) checkpoint and its step, or converted
    params (step None)."""
    if is_workdir:
        try:
            return store.restore_params(path, use_ema=True, step=step, with_step=True)
        except FileNotFoundError:
            raise FileNotFoundError(f"{path!r} holds no checkpoint yet: train it first "
                                    "(`python -m fmboost_jax.train ... --workdir=...`)") from None
    import orbax.checkpoint as ocp
    target = jax.eval_shape(cfm.init_params, jax.random.PRNGKey(0))
    return ocp.StandardCheckpointer().restore(paths.resolve(path), target), None


def load_upsampler(path: str, config: Any = None, *, vae: str | None = None,
                   dtype: str | None = None, step: int | None = None) -> Upsampler:
    """An `Upsampler` from a training workdir, or from converted params (`python -m
    fmboost_jax.convert unet`) with `config` (a ConfigDict or a `load_config` spec).

    `vae` overrides `config.first_stage.checkpoint`; `dtype` ("float32", "bfloat16", "auto")
    the compute dtype of the UNet and the VAE; `step` picks a checkpoint (default: the latest).
    Turns on JAX's persistent compilation cache (`compile_cache.enable`, unless configured or
    turned off), so that a new session compiles the boost of a known shape in seconds.
    """
    compile_cache.enable()
    if not paths.isdir(path):
        raise FileNotFoundError(f"model {path!r} does not exist")
    is_workdir = paths.exists(paths.join(path, store.CONFIG_FILE))
    if config is None:
        if not is_workdir:
            raise UserError(f"{path!r} is not a training workdir (no {store.CONFIG_FILE}): pass the "
                             "config of the converted params (config=...)")
        config = read_run_config(path)
    elif isinstance(config, str):
        config = config_lib.load_config(config)
    config = config_lib.with_defaults(config)          # a config from before a field existed
    with config.unlocked():
        if vae is not None:
            config.first_stage.checkpoint = vae
        if dtype is not None:
            config.dtype = config.first_stage.dtype = dtype
    config_lib.check_fields(config)
    for check in (first_stage.check_config, cfm_model.check_config, sampling.check_config,
                  first_stage.check_checkpoint):
        check(config)
    cfm = CFM.from_config(config)
    params, restored = _params(path, is_workdir, cfm, step)
    fs_params = cfm.first_stage.init_params(jax.random.PRNGKey(0))
    return Upsampler(cfm, params, fs_params, config, step=restored)
