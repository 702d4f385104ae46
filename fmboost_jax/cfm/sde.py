"""Stochastic sampling of the flow: Euler-Maruyama and the reference's stochastic Heun.

For a path `x_t = alpha_t x1 + sigma_t x0 (+ sigma_min eps)` whose marginals p_t the velocity v
transports, the SDE

    dx = [v(x, t) + D(t) grad log p_t(x)] dt + sqrt(2 D(t)) dW

has the same marginals for every diffusion D(t) >= 0 (in the Fokker-Planck equation the extra
drift cancels the extra diffusion). The score is a function of v when x0 is Gaussian given the
context (`score_from_velocity`), so each drift costs one network evaluation, not the reference's
two.

Time grid (the reference's): `num_steps` steps of size (1 - last_step_size) / num_steps from
t = 0, then a last step of `last_step_size` to t = 1: "Mean" (the drift, no noise), "Euler"
(the velocity alone) or "none" (the grid then ends at t = 1). "Mean" adds no noise, so it keeps
the marginals only where D(1) = 0 (every form but "constant", whose last step should be
"Euler"). The reference's `num_steps` N counts the grid's points: N - 1 steps here
(`num_points=N`). Evaluations: euler_maruyama 1 per step,
sde_heun 2, plus 1 for a "Mean" or "Euler" last step.

Diffusion forms D(t), all scaled by `diffusion_norm` as in the reference: constant, SBDM
(alpha'/alpha sigma^2 - sigma sigma', the score-based diffusion model's), sigma (sigma_t), linear
(1 - t), decreasing (0.25 (norm cos(pi t) + 1)^2), increasing-decreasing (sin(pi t)^2). SBDM is
infinite at t = 0, where the reference divides by zero; here its first step takes D = 0 (any D
keeps the marginals, and x0 is already an exact sample of p_0).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from fmboost_jax.cfm.flow import Path
from fmboost_jax.cfm.ode import ODEResult
from fmboost_jax.config import SDEOptions
from fmboost_jax.errors import UserError

Array = jax.Array
VelocityFn = Callable[[Array, Array, Any], Array]

SOLVERS = ("euler_maruyama", "sde_heun")
EVALS_PER_STEP = {"euler_maruyama": 1, "sde_heun": 2}
DIFFUSION_FORMS = ("constant", "SBDM", "sigma", "linear", "decreasing", "increasing-decreasing")
LAST_STEPS = ("Mean", "Euler", "none")


class Source(NamedTuple):
    """The coupling's source given the context: x0 ~ N(mean, std^2 I); mean like x0, std > 0."""
    mean: Array
    std: float


def _coef(t: Array, x: Array) -> Array:
    """A scalar t, or t (B,) shaped to broadcast against x (B, ...)."""
    t = jnp.asarray(t, jnp.float32)
    return t if t.ndim == 0 else t.reshape((-1,) + (1,) * (x.ndim - 1))


def score_from_velocity(path: Path, velocity: Array, x: Array, t: Array, source: Source,
                        sigma_min: float = 0.0) -> Array:
    """grad log p_t(x) from the velocity v(x, t), for x0 ~ N(m, s^2 I) given the context.

    Given x1 (and the context), x_t ~ N(alpha x1 + sigma m, lam I) with
    lam = sigma^2 s^2 + sigma_min^2, so averaging its score over x1 | x_t = x gives

        grad log p_t(x) = -(x - alpha mu1 - sigma m) / lam,        mu1 = E[x1 | x_t = x].

    The velocity is v = E[alpha' x1 + sigma' x0 | x_t = x]. Given x1, x0 and x_t are jointly
    Gaussian: E[x0 | x_t, x1] = m + kappa (x_t - alpha x1 - sigma m), kappa = sigma s^2 / lam.
    So v = (alpha' - sigma' kappa alpha) mu1 + sigma' (m + kappa (x - sigma m)), which gives

        mu1 = (v - sigma' (m + kappa (x - sigma m))) / (alpha' - sigma' kappa alpha).

    For the noised coupling m = sqrt(abar) z and s^2 = 1 - abar (z the up-sampled latent,
    abar the noising step's alpha-bar); with `start_from_noise` m = 0, s = 1. In that last case
    (and sigma_min = 0) this is the reference's (alpha/alpha' v - x) / (sigma^2 - alpha/alpha'
    sigma' sigma); for the noised source, the reference's formula is wrong. Shapes: v, x, m
    (B, ...); t scalar or (B,). Finite for t < 1 (at t = 1, lam = sigma_min^2).
    """
    tb = _coef(t, x)
    a, da, s, ds = path.alpha(tb), path.d_alpha(tb), path.sigma(tb), path.d_sigma(tb)
    m, var0 = source.mean, source.std ** 2
    lam = s ** 2 * var0 + sigma_min ** 2
    kappa = s * var0 / lam
    mu1 = (velocity - ds * (m + kappa * (x - s * m))) / (da - ds * kappa * a)
    return -(x - a * mu1 - s * m) / lam


def diffusion(path: Path, t: Array, form: str, norm: float) -> Array:
    """D(t) of a diffusion form (see the module docstring); t a scalar array."""
    if form == "constant":
        return jnp.asarray(norm, jnp.float32) + 0.0 * t
    if form == "SBDM":
        a, da, s, ds = path.alpha(t), path.d_alpha(t), path.sigma(t), path.d_sigma(t)
        safe_a = jnp.where(t > 0, a, 1.0)
        return jnp.where(t > 0, norm * (da / safe_a * s ** 2 - s * ds), 0.0)
    if form == "sigma":
        return norm * path.sigma(t)
    if form == "linear":
        return norm * (1.0 - t)
    if form == "decreasing":
        return 0.25 * (norm * jnp.cos(math.pi * t) + 1.0) ** 2
    if form == "increasing-decreasing":
        return norm * jnp.sin(math.pi * t) ** 2
    raise UserError(f"Unknown diffusion form {form!r}; valid forms are {', '.join(DIFFUSION_FORMS)}")


def time_grid(num_steps: int, last_step: str, last_step_size: float) -> np.ndarray:
    """The grid's times, (num_steps + 1,) from 0 to 1 - last_step_size (to 1 with "none")."""
    end = 1.0 if last_step == "none" else 1.0 - last_step_size
    return np.linspace(0.0, end, num_steps + 1)


def _saved_indices(times: np.ndarray, save_intermediates: int) -> np.ndarray:
    """Indices of the states nearest to linspace(0, 1, K + 1); the first and last are exact."""
    want = np.linspace(0.0, 1.0, save_intermediates + 1)
    idx = np.abs(times[None, :] - want[:, None]).argmin(axis=1)
    idx[0], idx[-1] = 0, len(times) - 1
    return idx


def check_options(solver: str, num_steps: int, o: SDEOptions) -> None:
    """Raises ValueError for an unknown solver, form or last step, or a bad step size."""
    for name, value, allowed in (("SDE solver", solver, SOLVERS),
                                 ("diffusion form", o.diffusion_form, DIFFUSION_FORMS),
                                 ("last step", o.last_step, LAST_STEPS)):
        if value not in allowed:
            raise UserError(f"Unknown {name} {value!r}; valid: {', '.join(allowed)}")
    if num_steps < 1:
        raise UserError(f"num_steps must be >= 1, got {num_steps}")
    if solver == "sde_heun" and o.last_step == "none":
        raise UserError("last_step 'none' with sde_heun evaluates the drift at t = 1, where the "
                         "score is infinite: use last_step 'Mean' or 'Euler'")
    if o.last_step != "none" and not 0.0 < o.last_step_size < 1.0:
        raise UserError(f"last_step_size must be in (0, 1), got {o.last_step_size}")
    if not o.diffusion_norm >= 0:
        raise UserError(f"diffusion_norm must be >= 0, got {o.diffusion_norm}")


def integrate(velocity_fn: VelocityFn, x0: Array, rng: jax.Array, *, path: Path,
              source: Source, sigma_min: float = 0.0, solver: str = "euler_maruyama",
              num_steps: int, save_intermediates: int = 0, args: Any = None,
              **options: Any) -> ODEResult:
    """Samples the SDE from x0 (B, ...) at t = 0 to t = 1 with explicit randomness `rng`.

    `velocity_fn(t, x, args)` as for `ode.integrate` (t a scalar array); `options`: fields of
    `SDEOptions`. Returns `ODEResult(x1, stats, intermediates)`: stats `nfe` (velocity
    evaluations), `num_steps` (including the last step), `success` (1 if x1 is finite); with
    `save_intermediates=K`, the K + 1 grid states nearest to linspace(0, 1, K + 1), stacked
    (K + 1, B, ...). Jittable; a sharded batch stays sharded.
    """
    o = SDEOptions(**options)
    check_options(solver, num_steps, o)
    ts = time_grid(num_steps, o.last_step, o.last_step_size)
    dt = float(ts[1] - ts[0])

    def drift(t: Array, x: Array) -> Array:
        v = velocity_fn(t, x, args)
        d = diffusion(path, t, o.diffusion_form, o.diffusion_norm)
        score = score_from_velocity(path, v, x, t, source, sigma_min)
        return v + jnp.where(d > 0, d * score, 0.0), d

    def step(x: Array, inputs: tuple[Array, Array]) -> tuple[Array, Array | None]:
        t, key = inputs
        noise = jax.random.normal(key, x.shape, x.dtype)
        if solver == "euler_maruyama":
            f, d = drift(t, x)
            x = x + f * dt + jnp.sqrt(2.0 * d * dt) * noise
        else:   # the reference's Heun: the noise first, then Heun's rule on the drift
            d = diffusion(path, t, o.diffusion_form, o.diffusion_norm)
            x = x + jnp.sqrt(2.0 * d * dt) * noise
            k1, _ = drift(t, x)
            k2, _ = drift(t + dt, x + dt * k1)
            x = x + 0.5 * dt * (k1 + k2)
        return x, (x if save_intermediates else None)

    keys = jax.random.split(rng, num_steps)
    x, path_states = jax.lax.scan(step, x0, (jnp.asarray(ts[:-1], jnp.float32), keys))
    t_end = jnp.asarray(ts[-1], jnp.float32)
    if o.last_step == "Mean":
        x = x + drift(t_end, x)[0] * o.last_step_size
    elif o.last_step == "Euler":
        x = x + velocity_fn(t_end, x, args) * o.last_step_size

    last = int(o.last_step != "none")
    stats = {"nfe": jnp.asarray(EVALS_PER_STEP[solver] * num_steps + last, jnp.int32),
             "num_steps": jnp.asarray(num_steps + last, jnp.int32),
             "num_accepted_steps": jnp.asarray(num_steps + last, jnp.int32),
             "num_rejected_steps": jnp.asarray(0, jnp.int32),
             "success": jnp.all(jnp.isfinite(x)).astype(jnp.int32)}
    intermediates = None
    if save_intermediates:
        states = jnp.concatenate([x0[None], path_states] + ([x[None]] if last else []))
        times = np.concatenate([ts, [1.0]] if last else [ts])
        intermediates = states[_saved_indices(times, save_intermediates)]
    return ODEResult(x, stats, intermediates)
