"""Sampling: integrate the learned flow from the coupled source to the high-res latent.

    x0, ctx = coupling(upsample(lowres))  # as in training (PSU, noising_step, ...)
    x1      = ODE solve of dx/dt = v_theta(x, t, ctx) from t = 0 to 1   (diffrax)
    image   = first_stage.decode(x1)

The output size follows the input's: (B, h, w, 3) low-res images give (B, h * upscale,
w * upscale, 3). `make_sample_fn(cfm, ...)` returns a jitted `sample(params, fs_params,
lowres_images, rng)` for notebooks; pass EMA params (see `sampling_params`) for the best results.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax

from fmboost_jax.cfm import ode
from fmboost_jax.cfm.model import CFM
from fmboost_jax.cfm.upsampling import LowRes
from fmboost_jax.config import ConfigError, check_one_of, check_range

Array = jax.Array
PyTree = Any


class SampleOutput(NamedTuple):
    """images (B, H, W, 3) in [-1, 1] (None when not decoded); latents (B, h, w, C); stats of the solver
    (`nfe`, `num_steps`, `num_accepted_steps`, `num_rejected_steps`, `success`); intermediates:
    (K + 1, B, h, w, C) latents along the path when `save_intermediates=K > 0`, else None."""
    images: Array
    latents: Array
    stats: dict[str, Array]
    intermediates: Array | None


def sampling_params(state: Any, use_ema: bool = True) -> PyTree:
    """The UNet params to sample with: the EMA copy when present and wanted."""
    ema = getattr(state, "ema_params", None)
    return ema if (use_ema and ema is not None) else state.params


def sample(cfm: CFM, params: PyTree, fs_params: PyTree, lowres_images: Array, rng: jax.Array,
           **kwargs: Any) -> SampleOutput:
    """Up-samples low-res images (B, h, w, 3) in [-1, 1] to (B, h * upscale, w * upscale, 3).

    `kwargs`: `ode.SolverOptions` fields (unset: the table's defaults), `save_intermediates`,
    `per_sample`, `throw`."""
    _, h, w, _ = lowres_images.shape
    size = cfm.latent_size((h * cfm.upscale, w * cfm.upscale))
    return integrate(cfm, params, fs_params, LowRes(images=lowres_images), size, rng, **kwargs)


def sample_latents(cfm: CFM, params: PyTree, fs_params: PyTree, lowres_latents: Array,
                   rng: jax.Array, *, decode: bool = True, **kwargs: Any) -> SampleOutput:
    """Up-samples low-res latents (B, h, w, C), scaled as the first stage's `encode` returns them
    (as a diffusion model emits them), to latents (B, h * upscale, w * upscale, C) and, with
    `decode`, images (B, f h upscale, f w upscale, 3); `images` is None otherwise. PSU decodes
    the latents, up-samples the images in pixel space and encodes them, as at training time."""
    _, h, w, c = lowres_latents.shape
    if c != cfm.first_stage.latent_channels:
        raise ValueError(f"latents have {c} channels, but the model's first stage has "
                         f"{cfm.first_stage.latent_channels} (shape {lowres_latents.shape})")
    f = cfm.first_stage.downsample_factor
    size = cfm.latent_size((h * f * cfm.upscale, w * f * cfm.upscale))
    return integrate(cfm, params, fs_params, LowRes(latent=lowres_latents), size, rng,
                     decode=decode, **kwargs)


def integrate(cfm: CFM, params: PyTree, fs_params: PyTree, lowres: LowRes,
              size: tuple[int, int], rng: jax.Array, *, decode: bool = True,
              save_intermediates: int = 0, per_sample: bool = False, throw: bool = True,
              **options: Any) -> SampleOutput:
    """The flow from the coupled source of `lowres` to latents of `size`, decoded if asked."""
    x0, context = cfm.couple(fs_params, lowres, size, rng)

    def velocity(t: Array, x: Array, args: tuple[PyTree, Array | None]) -> Array:
        p, ctx = args
        return cfm.velocity(p, x, t, ctx)

    res = ode.integrate(velocity, x0, save_intermediates=save_intermediates,
                        per_sample=per_sample, throw=throw, args=(params, context),
                        args_axes=(None, 0), **options)
    images = cfm.first_stage.decode(fs_params, res.x1) if decode else None
    return SampleOutput(images, res.x1, res.stats, res.intermediates)


def make_sample_fn(cfm: CFM, *, latents: bool = False, **sample_options: Any):
    """A jitted `sample(params, fs_params, lowres_images, rng) -> SampleOutput`, or with
    `latents` of `sample_latents(params, fs_params, lowres_latents, rng)`.

    `sample_options` (the `ode.SolverOptions` fields, save_intermediates, per_sample, throw and,
    for latents, decode) are fixed at construction; a new option set compiles a new function, a
    new input shape retraces.
    """
    return jax.jit(functools.partial(sample_latents if latents else sample, cfm, **sample_options))


def solver_options(sampling: Any) -> dict[str, Any]:
    """The solver options of a config's `sampling` block, as keyword arguments of `sample`."""
    return {name: sampling[name] for name in ode.SolverOptions._fields}


def check_config(config: Any) -> None:
    """The rules of `config.sampling`."""
    check_one_of(config, "sampling.solver", ode.SOLVERS)
    check_range(config, "sampling.num_steps", 1)
    check_range(config, "sampling.max_steps", 1)
    for field in ("rtol", "atol", "dt0"):
        if not config.sampling[field] > 0:
            raise ConfigError(f"sampling.{field}", f"must be > 0, got {config.sampling[field]}")
