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
    """images (B, H, W, 3) in [-1, 1]; latents (B, h, w, C); stats of the solver
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
           *, save_intermediates: int = 0, per_sample: bool = False, throw: bool = True,
           **options: Any) -> SampleOutput:
    """Up-samples low-res images (B, h, w, 3) in [-1, 1] to (B, h * upscale, w * upscale, 3).

    `options` are `ode.SolverOptions` fields (unset: the table's defaults)."""
    _, h, w, _ = lowres_images.shape
    size = cfm.latent_size((h * cfm.upscale, w * cfm.upscale))
    x0, context = cfm.couple(fs_params, LowRes(images=lowres_images), size, rng)

    def velocity(t: Array, x: Array, args: tuple[PyTree, Array | None]) -> Array:
        p, ctx = args
        return cfm.velocity(p, x, t, ctx)

    res = ode.integrate(velocity, x0, save_intermediates=save_intermediates,
                        per_sample=per_sample, throw=throw, args=(params, context),
                        args_axes=(None, 0), **options)
    images = cfm.first_stage.decode(fs_params, res.x1)
    return SampleOutput(images, res.x1, res.stats, res.intermediates)


def make_sample_fn(cfm: CFM, **sample_options: Any):
    """A jitted `sample(params, fs_params, lowres_images, rng) -> SampleOutput`.

    `sample_options` (the `ode.SolverOptions` fields, save_intermediates, per_sample, throw) are
    fixed at construction; a new option set compiles a new function, a new input shape retraces.
    """
    return jax.jit(functools.partial(sample, cfm, **sample_options))


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
