"""Flow matching: probability paths between the coupling source x0 and target x1, and the loss.

`x_t = alpha_t x1 + sigma_t x0 (+ sigma_min eps)`, target velocity
`u_t = alpha'_t x1 + sigma'_t x0`. The linear path (`alpha_t = t`, `sigma_t = 1 - t`)
is the paper's; the GVP path (`alpha_t = sin(pi t / 2)`, `sigma_t = cos(pi t / 2)`)
is the reference's alternative. Arrays are (B, H, W, C); `t` is (B,).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from fmboost_jax.errors import ConfigError, check_one_of

Array = jax.Array


class Path(NamedTuple):
    """Coefficients of a path and their time derivatives, each `t -> array`."""
    alpha: Callable[[Array], Array]
    d_alpha: Callable[[Array], Array]
    sigma: Callable[[Array], Array]
    d_sigma: Callable[[Array], Array]


LINEAR = Path(alpha=lambda t: t, d_alpha=jnp.ones_like,
              sigma=lambda t: 1.0 - t, d_sigma=lambda t: -jnp.ones_like(t))
GVP = Path(alpha=lambda t: jnp.sin(0.5 * math.pi * t),
           d_alpha=lambda t: 0.5 * math.pi * jnp.cos(0.5 * math.pi * t),
           sigma=lambda t: jnp.cos(0.5 * math.pi * t),
           d_sigma=lambda t: -0.5 * math.pi * jnp.sin(0.5 * math.pi * t))


PATHS = {"linear": LINEAR, "gvp": GVP}


def check_config(config: Any) -> None:
    """The rules of `config.flow`: a known path; GVP takes no sigma_min, as in the reference."""
    check_one_of(config, "flow.schedule", tuple(PATHS))
    if config.flow.schedule == "gvp" and config.flow.sigma_min > 0:
        raise ConfigError("flow.sigma_min", "must be 0 with flow.schedule='gvp'")


def _bcast(t: Array, x: Array) -> Array:
    return t.reshape((-1,) + (1,) * (x.ndim - 1)).astype(x.dtype)


def compute_xt(path: Path, x0: Array, x1: Array, t: Array, sigma_min: float = 0.0,
               eps: Array | None = None) -> Array:
    """Point on the path at time t (B,): alpha_t x1 + sigma_t x0 [+ sigma_min eps]."""
    tb = _bcast(t, x0)
    xt = path.alpha(tb) * x1 + path.sigma(tb) * x0
    if sigma_min > 0:
        if eps is None:
            raise ValueError("compute_xt: sigma_min > 0 needs eps")
        xt = xt + sigma_min * eps
    return xt


def compute_ut(path: Path, x0: Array, x1: Array, t: Array) -> Array:
    """Conditional target velocity d x_t / d t = alpha'_t x1 + sigma'_t x0."""
    tb = _bcast(t, x0)
    return path.d_alpha(tb) * x1 + path.d_sigma(tb) * x0


def flow_matching_loss(velocity_fn: Callable[[Array, Array], Array], path: Path,
                       x0: Array, x1: Array, rng: jax.Array,
                       sigma_min: float = 0.0) -> Array:
    """Mean over all elements of (v(x_t, t) - u_t)^2 with t ~ U(0, 1) per sample.

    `velocity_fn(x_t, t)` closes over the network params and the context.
    """
    t_rng, eps_rng = jax.random.split(rng)
    t = jax.random.uniform(t_rng, (x1.shape[0],), dtype=jnp.float32)
    eps = jax.random.normal(eps_rng, x1.shape, x1.dtype) if sigma_min > 0 else None
    xt = compute_xt(path, x0, x1, t, sigma_min, eps)
    ut = compute_ut(path, x0, x1, t)
    vt = velocity_fn(xt, t)
    return jnp.mean(jnp.square(vt.astype(jnp.float32) - ut.astype(jnp.float32)))
