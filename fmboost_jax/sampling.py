"""Sampling: integrate the learned flow from the coupled source to the high-res latent.

    x0, ctx = coupling(lowres)            # as in training (PSU, noising_step, ...)
    x1      = ODE solve of dx/dt = v_theta(x, t, ctx) from t = 0 to 1   (diffrax)
    image   = first_stage.decode(x1)

`make_sample_fn(cfm, ...)` returns a jitted `sample(params, fs_params, lowres_images,
rng)` for notebooks; pass EMA params (see `sampling_params`) for the best results.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from fmboost_jax import ode
from fmboost_jax.cfm import CFM

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


def sample(cfm: CFM, params: PyTree, fs_params: PyTree, lowres_images: Array,
           rng: jax.Array, *, solver: str = "dopri5", num_steps: int = 40,
           rtol: float = 1e-3, atol: float = 1e-6, dt0: float = 0.01,
           max_steps: int = 4096, save_intermediates: int = 0,
           per_sample: bool = False, throw: bool = True) -> SampleOutput:
    """Up-samples low-res images (B, h, w, 3) in [-1, 1] to (B, H, W, 3)."""
    b, h, w, _ = lowres_images.shape
    if h != w or h != cfm.low_res_size:
        raise ValueError(f"sample: low-res images must be {cfm.low_res_size}x{cfm.low_res_size}, "
                         f"got {h}x{w} (shape {lowres_images.shape})")
    x0, context = cfm.source_and_context(fs_params, lowres_images, rng)

    def velocity(t: Array, x: Array, args: tuple[PyTree, Array | None]) -> Array:
        p, ctx = args
        return cfm.velocity(p, x, t, ctx)

    def solve(x0: Array, context: Array | None) -> ode.ODEResult:
        return ode.integrate(velocity, x0, solver=solver, num_steps=num_steps, rtol=rtol,
                             atol=atol, dt0=dt0, max_steps=max_steps,
                             save_intermediates=save_intermediates, throw=throw,
                             args=(params, context))

    if per_sample:
        # Each sample gets its own adaptive steps: solve batches of one under vmap.
        one = lambda x, c: solve(x[None], None if c is None else c[None])
        res = jax.vmap(one)(x0, context)
        x1 = res.x1[:, 0]
        inter = None if res.intermediates is None else jnp.swapaxes(res.intermediates[:, :, 0], 0, 1)
    else:
        res = solve(x0, context)
        x1, inter = res.x1, res.intermediates
    images = cfm.first_stage.decode(fs_params, x1)
    return SampleOutput(images, x1, res.stats, inter)


def make_sample_fn(cfm: CFM, **solver_options: Any):
    """A jitted `sample(params, fs_params, lowres_images, rng) -> SampleOutput`.

    `solver_options` (solver, num_steps, rtol, atol, dt0, max_steps, save_intermediates,
    per_sample, throw) are fixed at construction; a new option set compiles a new function.
    """
    return jax.jit(functools.partial(sample, cfm, **solver_options))


def solver_options(sampling: Any) -> dict[str, Any]:
    """The solver options of a config's `sampling` block, as keyword arguments of `sample`."""
    return dict(solver=sampling.solver, num_steps=sampling.num_steps, rtol=sampling.rtol,
                atol=sampling.atol, max_steps=sampling.max_steps)


def sample_fn_from_config(cfm: CFM, sampling: Any):
    """`make_sample_fn` with the options of a config's `sampling` block."""
    return make_sample_fn(cfm, **solver_options(sampling))
