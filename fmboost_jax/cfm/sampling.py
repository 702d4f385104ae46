"""Sampling: integrate the learned flow from the coupled source to the high-res latent.

    x0, ctx = coupling(upsample(lowres))  # as in training (PSU, noising_step, ...)
    x1      = ODE solve of dx/dt = v_theta(x, t, ctx) from t = 0 to 1   (diffrax, `ode.py`)
              or an SDE with the same marginals                      (`sde.py`)
    image   = first_stage.decode(x1)

`config.sampling.solver` picks the sampler (`SOLVERS`); `guidance_scale` w != 1 samples with
classifier-free guidance, for models trained with `coupling.context_dropout`. A regression
model (`config.objective = "regression"`, the paper's baseline) takes no solver: one pass.

The output size follows the input's: (B, h, w, 3) low-res images give (B, h * upscale,
w * upscale, 3). `make_sample_fn(cfm, ...)` returns a jitted `sample(params, fs_params,
lowres_images, rng)` for notebooks; pass EMA params (see `sampling_params`) for the best results.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from fmboost_jax.cfm import ode, sde
from fmboost_jax.cfm.model import CFM
from fmboost_jax.cfm.upsampling import LowRes
from fmboost_jax.config import GUIDANCE_SCALE
from fmboost_jax.errors import ConfigError, UserError, check_one_of, check_range

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

    `kwargs`: `ode.SolverOptions` and `sde.SDEOptions` fields (unset: the tables' defaults),
    `guidance_scale`, `save_intermediates`, `per_sample`, `throw`."""
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
        raise UserError(f"latents have {c} channels, but the model's first stage has "
                         f"{cfm.first_stage.latent_channels} (shape {lowres_latents.shape})")
    f = cfm.first_stage.downsample_factor
    size = cfm.latent_size((h * f * cfm.upscale, w * f * cfm.upscale))
    return integrate(cfm, params, fs_params, LowRes(latent=lowres_latents), size, rng,
                     decode=decode, **kwargs)


SOLVERS = ode.SOLVERS + sde.SOLVERS


def integrate(cfm: CFM, params: PyTree, fs_params: PyTree, lowres: LowRes,
              size: tuple[int, int], rng: jax.Array, *, decode: bool = True,
              save_intermediates: int = 0, per_sample: bool = False, throw: bool = True,
              guidance_scale: float = GUIDANCE_SCALE, **options: Any) -> SampleOutput:
    """The flow from the coupled source of `lowres` to latents of `size`, decoded if asked.

    `options`: `ode.SolverOptions` and `sde.SDEOptions` fields; an SDE solver (`sde.SOLVERS`)
    samples with the rest of `rng`, and ignores `per_sample` and `throw` (its steps are fixed;
    `success` reports a non-finite result). With guidance (w != 1) every evaluation is of a
    doubled batch, and `nfe` counts both halves."""
    couple_rng, sde_rng = jax.random.split(rng)   # one key per use: the coupling, the SDE noise
    x0, context, z_up = cfm.couple(fs_params, lowres, size, couple_rng)

    def velocity(t: Array, x: Array, args: tuple[PyTree, Array | None]) -> Array:
        p, ctx = args
        return cfm.guided_velocity(p, x, t, ctx, guidance_scale)

    sde_options = {k: options.pop(k) for k in sde.SDEOptions._fields if k in options}
    solver = options.get("solver", ode.SolverOptions().solver)
    if cfm.objective == "regression":        # one pass, no solver
        res = _regress(cfm, params, x0, context, save_intermediates)
    elif solver in sde.SOLVERS:
        if cfm.coupling.source_std == 0:
            raise UserError(f"solver {solver!r} needs a noised source (coupling.noising_step > 0 "
                             "or start_from_noise): this model's source has no score")
        steps = ode.fixed_steps(options.get("num_steps", ode.SolverOptions().num_steps),
                                options.get("num_points", 0))
        source = sde.Source(cfm.coupling.source_mean(z_up), cfm.coupling.source_std)
        res = sde.integrate(velocity, x0, sde_rng, path=cfm.path, source=source,
                            sigma_min=cfm.sigma_min, solver=solver, num_steps=steps,
                            save_intermediates=save_intermediates, args=(params, context),
                            **sde_options)
    else:
        res = ode.integrate(velocity, x0, save_intermediates=save_intermediates,
                            per_sample=per_sample, throw=throw, args=(params, context),
                            args_axes=(None, 0), **options)
    stats = res.stats
    if guidance_scale != 1.0:
        stats = {**stats, "nfe": 2 * stats["nfe"]}
    images = cfm.first_stage.decode(fs_params, res.x1) if decode else None
    return SampleOutput(images, res.x1, stats, res.intermediates)


def _regress(cfm: CFM, params: PyTree, x0: Array, context: Array | None,
             save_intermediates: int) -> ode.ODEResult:
    """The regression baseline's x1 in one network evaluation, as an `ODEResult`."""
    x1 = cfm.regress(params, x0, context)
    one = jnp.asarray(1, jnp.int32)
    stats = {"nfe": one, "num_steps": one, "num_accepted_steps": one,
             "num_rejected_steps": jnp.asarray(0, jnp.int32), "success": one}
    inter = None
    if save_intermediates:   # the straight line of the one pass, as one Euler step's dense output
        tau = jnp.linspace(0.0, 1.0, save_intermediates + 1).reshape((-1,) + (1,) * x0.ndim)
        inter = x0[None] + tau * (x1 - x0)[None]
    return ode.ODEResult(x1, stats, inter)


def make_sample_fn(cfm: CFM, *, latents: bool = False, **sample_options: Any):
    """A jitted `sample(params, fs_params, lowres_images, rng) -> SampleOutput`, or with
    `latents` of `sample_latents(params, fs_params, lowres_latents, rng)`.

    `sample_options` (the `ode.SolverOptions` fields, save_intermediates, per_sample, throw and,
    for latents, decode) are fixed at construction; a new option set compiles a new function, a
    new input shape retraces.
    """
    return jax.jit(functools.partial(sample_latents if latents else sample, cfm, **sample_options))


def solver_options(sampling: Any) -> dict[str, Any]:
    """The sampler options of a config's `sampling` block, as keyword arguments of `sample`."""
    names = (*ode.SolverOptions._fields, *sde.SDEOptions._fields, "guidance_scale")
    return {name: sampling[name] for name in names}


def check_config(config: Any) -> None:
    """The rules of `config.sampling`, and the SDE solvers' and guidance's needs of the
    coupling."""
    sp, cp = config.sampling, config.coupling
    check_one_of(config, "sampling.solver", SOLVERS)
    check_range(config, "sampling.num_steps", 1)
    check_range(config, "sampling.max_steps", 1)
    if sp.num_points and sp.num_points < 2:
        raise ConfigError("sampling.num_points", f"must be 0 (unset) or >= 2, got {sp.num_points}")
    for field in ("rtol", "atol", "dt0"):
        if not sp[field] > 0:
            raise ConfigError(f"sampling.{field}", f"must be > 0, got {sp[field]}")
    if sp.solver in sde.SOLVERS and config.objective != "regression":   # it takes no solver
        _check_sde(config)
    if sp.guidance_scale != 1.0 and cp.context_dropout <= 0:
        raise ConfigError("sampling.guidance_scale", f"is {sp.guidance_scale}, but the model "
                          "never learned an unconditional velocity: train with "
                          "coupling.context_dropout > 0 (e.g. 0.1), or sample with 1.0")


def _check_sde(config: Any) -> None:
    """An SDE solver needs a Gaussian source (its score) and the reference's step settings."""
    sp, cp = config.sampling, config.coupling
    if not cp.start_from_noise and cp.noising_step <= 0:
        raise ConfigError("coupling.noising_step", f"is {cp.noising_step}: the source is the bare "
                          f"up-sampled latent, which has no score, so sampling.solver="
                          f"{sp.solver!r} cannot sample it; train with a noised source "
                          "(e.g. coupling.noising_step=400) or use an ODE solver")
    if not cp.start_from_noise and not cp.concat_context:
        raise ConfigError("coupling.concat_context", f"is False: sampling.solver={sp.solver!r} "
                          "needs the source's mean, which the network knows only from the "
                          "context; use an ODE solver")
    if (not cp.start_from_noise and cp.upsampling_mode == "noise_upsampling"
            and cp.upsampling_mode_context not in ("", cp.upsampling_mode)):
        raise ConfigError("coupling.upsampling_mode_context", f"differs from the source's "
                          f"random 'noise_upsampling', so the source's mean is not known from the "
                          f"context and sampling.solver={sp.solver!r} has no score; use an ODE "
                          "solver")
    check_one_of(config, "sampling.diffusion_form", sde.DIFFUSION_FORMS)
    check_one_of(config, "sampling.last_step", sde.LAST_STEPS)
    if sp.solver == "sde_heun" and sp.last_step == "none":
        raise ConfigError("sampling.last_step", "'none' with sde_heun evaluates the drift at "
                          "t = 1, where the score is infinite: use 'Mean' or 'Euler'")
    if sp.last_step != "none":
        check_range(config, "sampling.last_step_size", 1e-6, 1.0)
    check_range(config, "sampling.diffusion_norm", 0.0)
