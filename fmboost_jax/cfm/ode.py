"""ODE integration of a flow velocity field from t=0 to t=1: dopri5 with diffrax, the fixed-step
rules as one `lax.scan`.

`integrate(velocity_fn, x0, ...)` solves `dx/dt = velocity_fn(t, x, args)` on [0, 1] and returns an
`ODEResult(x1, stats, intermediates)`. `x0` is an array or pytree of arrays whose leaves share a
leading batch axis, e.g. latents (B, H, W, C).

Step convention: `num_steps` is the number of integration steps (intervals) of the fixed-step
solvers, on the grid `linspace(0, 1, num_steps + 1)`. The reference instead passes
`t = linspace(0, 1, N)` time *points* to torchdiffeq, i.e. N - 1 steps: its validation sampler
("rk4" with 40 points, 39 * 4 = 156 network evaluations) is `solver="rk4", num_steps=39` here, or
in the reference's terms `num_points=40` (when set, `num_points` replaces `num_steps`).

Solvers: "rk4" is torchdiffeq's (the 3/8 rule), "rk4_classic" the 1/6-1/3-1/3-1/6 rule. The
fixed-step rules are written out (`TABLEAUX`) rather than run through diffrax: diffrax's runtime
checks are host callbacks, and JAX's persistent compilation cache does not store programs that
hold any, so a fixed-step sampler is compiled once and read back in later processes.
Evaluations per step: euler 1, heun 2, midpoint 2, rk4 and rk4_classic 4. dopri5 is FSAL:
1 evaluation at t=0, then 6 per attempted (accepted or rejected) step: nfe = 1 + 6 * num_steps.

Batch semantics of dopri5: by default one error norm (RMS over every element of the whole batch)
drives a single step-size sequence shared by all samples, diffrax's default. With
`per_sample=True` the solve is vmapped over the batch axis, so each sample gets its own step sizes
and its own stats; `velocity_fn` still receives batched inputs, with batch size 1 per sample.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import diffrax
import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from fmboost_jax.config import SolverOptions
from fmboost_jax.errors import UserError

Array = jax.Array
PyTree = Any
VelocityFn = Callable[[Array, PyTree, Any], PyTree]

SOLVERS = ("dopri5", "euler", "heun", "midpoint", "rk4", "rk4_classic")

class Tableau(NamedTuple):
    """An explicit Runge-Kutta rule. Stage i evaluates v(t + c[i] h, x + h sum_j a[i][j] k_j); the
    step is x + h sum_i b[i] k_i. `dense`: how states between grid points are read, "linear"
    (Euler's) or "hermite", the cubic Hermite polynomial on (x_n, h k_first, x_n+1, h k_last)
    (diffrax's `ThirdOrderHermitePolynomialInterpolation.from_k`)."""
    c: tuple[float, ...]
    a: tuple[tuple[float, ...], ...]
    b: tuple[float, ...]
    dense: str = "hermite"


TABLEAUX: dict[str, Tableau] = {
    "euler": Tableau((0.0,), ((),), (1.0,), dense="linear"),
    "heun": Tableau((0.0, 1.0), ((), (1.0,)), (0.5, 0.5)),
    "midpoint": Tableau((0.0, 0.5), ((), (0.5,)), (0.0, 1.0)),
    # torchdiffeq's `rk4` (its `rk4_alt_step_func`), the reference's validation sampler: Kutta's
    # 3/8 rule, stages at t, t + h/3, t + 2h/3, t + h.
    "rk4": Tableau((0.0, 1 / 3, 2 / 3, 1.0), ((), (1 / 3,), (-1 / 3, 1.0), (1.0, -1.0, 1.0)),
                   (1 / 8, 3 / 8, 3 / 8, 1 / 8)),
    "rk4_classic": Tableau((0.0, 0.5, 0.5, 1.0), ((), (0.5,), (0.0, 0.5), (0.0, 0.0, 1.0)),
                           (1 / 6, 1 / 3, 1 / 3, 1 / 6)),
}
# Velocity evaluations per step of the fixed-step solvers.
EVALS_PER_STEP = {name: len(tab.b) for name, tab in TABLEAUX.items()}


class ODEResult(NamedTuple):
    """Output of `integrate`.

    x1: the state at t=1, same structure and shapes as x0.
    stats: dict of int32 arrays `nfe` (velocity evaluations), `num_steps` (attempted steps),
      `num_accepted_steps`, `num_rejected_steps`; scalars, or shape (B,) with `per_sample=True`.
    intermediates: with `save_intermediates=K > 0`, the states at `linspace(0, 1, K + 1)`, each
      leaf of shape (K + 1, *x0_leaf.shape) (first = x0, last = x1); else None. Times that are not
      step boundaries are read from the solver's dense interpolation.
    """
    x1: PyTree
    stats: dict[str, Array]
    intermediates: PyTree | None


def fixed_steps(num_steps: int, num_points: int = 0) -> int:
    """The steps of a fixed-step solver: `num_points - 1` when the reference's time points are
    given (> 0), else `num_steps`."""
    if num_points and int(num_points) < 2:
        raise UserError(f"num_points must be 0 (unset) or >= 2, got {num_points}")
    return int(num_points) - 1 if num_points else int(num_steps)


def _check_options(o: SolverOptions, save_intermediates: int) -> None:
    if o.solver not in SOLVERS:
        raise UserError(f"Unknown ODE solver {o.solver!r}; valid solvers are {', '.join(SOLVERS)}")
    fixed_steps(o.num_steps, o.num_points)
    for name, value, low in (("num_steps", o.num_steps, 1), ("max_steps", o.max_steps, 1),
                             ("save_intermediates", save_intermediates, 0)):
        if int(value) < low:
            raise UserError(f"{name} must be >= {low}, got {value}")
    if o.dt0 is None or (isinstance(o.dt0, (int, float)) and not o.dt0 > 0):
        raise UserError(f"dt0 must be > 0, got {o.dt0}")


def _save_at(save_intermediates: int) -> diffrax.SaveAt:
    """x1 only, or x0, the interior points of linspace(0, 1, K + 1), and x1 (exact at both ends)."""
    if save_intermediates == 0:
        return diffrax.SaveAt(t1=True)
    interior = jnp.linspace(0.0, 1.0, save_intermediates + 1)[1:-1]
    return diffrax.SaveAt(t0=True, ts=interior if save_intermediates > 1 else None, t1=True)


def _rk_step(velocity_fn: VelocityFn, tab: Tableau, t: Array, h: Array, x: PyTree, args: Any
             ) -> tuple[PyTree, PyTree, PyTree]:
    """One step of `tab` from (t, x): (x at t + h, h k_first, h k_last)."""
    def combine(weights: tuple[float, ...], ks: list[PyTree]) -> PyTree:
        terms = [(w, k) for w, k in zip(weights, ks) if w]
        if not terms:
            return x
        return jax.tree.map(lambda x0, *k: x0 + h * sum(w * kk for (w, _), kk in zip(terms, k)),
                            x, *[k for _, k in terms])

    ks: list[PyTree] = []
    for c, a in zip(tab.c, tab.a):
        k = velocity_fn(t + c * h, combine(a, ks), args)
        ks.append(jax.tree.map(lambda f, x0: jnp.asarray(f, x0.dtype), k, x))
    scaled = lambda k: jax.tree.map(lambda v: h * v, k)
    return combine(tab.b, ks), scaled(ks[0]), scaled(ks[-1])


def _dense(tab: Tableau, x0: Array, x1: Array, k0: Array, k1: Array, s: Array) -> Array:
    """States at fractions `s` (K,) of a step, (K, *x0.shape): linear, or the cubic Hermite
    polynomial a s^3 + b s^2 + k0 s + x0 through x1 at s = 1."""
    s = s.reshape(s.shape + (1,) * x0.ndim).astype(x0.dtype)
    if tab.dense == "linear":
        return x0 + s * (x1 - x0)
    a = k0 + k1 + 2 * x0 - 2 * x1
    b = -2 * k0 - k1 - 3 * x0 + 3 * x1
    return ((a * s + b) * s + k0) * s + x0


def _solve_fixed(velocity_fn: VelocityFn, x0: PyTree, args: Any, solver: str, num_steps: int,
                 save_intermediates: int) -> ODEResult:
    """`num_steps` steps of a fixed rule over `linspace(0, 1, num_steps + 1)` (the reference's
    exact grid, not accumulated t += h), one `lax.scan`."""
    tab = TABLEAUX[solver]
    grid64 = np.linspace(0.0, 1.0, num_steps + 1)
    grid = jnp.asarray(grid64, jax.dtypes.canonicalize_dtype(float))   # float64 under x64
    K = save_intermediates
    # Which step holds each saved time, and where in it (static: the grid and K are).
    taus = np.linspace(0.0, 1.0, K + 1)
    step_of = np.clip(np.searchsorted(grid64, taus, side="left") - 1, 0, num_steps - 1)
    frac = (taus - grid64[step_of]) / (grid64[step_of + 1] - grid64[step_of])

    def body(carry, n):
        x, saved = carry
        x1, k0, k1 = _rk_step(velocity_fn, tab, grid[n], grid[n + 1] - grid[n], x, args)
        if saved is not None:
            here = jnp.asarray(step_of) == n
            def update(sv, xa, xb, ka, kb):  # (K + 1, *leaf) saved states, a leaf of each
                inside = here.reshape((-1,) + (1,) * xa.ndim)
                return jnp.where(inside, _dense(tab, xa, xb, ka, kb, jnp.asarray(frac)), sv)
            saved = jax.tree.map(update, saved, x, x1, k0, k1)
        return (x1, saved), None

    saved0 = jax.tree.map(lambda v: jnp.broadcast_to(v, (K + 1,) + v.shape), x0) if K else None
    (x1, saved), _ = jax.lax.scan(body, (x0, saved0), jnp.arange(num_steps))
    if saved is not None:   # exact at both ends
        saved = jax.tree.map(lambda sv, a, b: sv.at[0].set(a).at[-1].set(b), saved, x0, x1)
    steps = jnp.asarray(num_steps, jnp.int32)
    stats = {"nfe": EVALS_PER_STEP[solver] * steps, "num_steps": steps,
             "num_accepted_steps": steps, "num_rejected_steps": jnp.zeros((), jnp.int32),
             "success": jnp.ones((), jnp.int32)}
    return ODEResult(x1, stats, saved)


# filter_jit: one compiled program per static configuration (solver, num_steps, ...), also when
# `integrate` is called eagerly; inside an outer jit it is inlined.
@eqx.filter_jit
def _solve(velocity_fn: VelocityFn, x0: PyTree, args: Any, *, solver: str, num_steps: int,
           rtol: Array, atol: Array, dt0: Array, max_steps: int, save_intermediates: int,
           throw: bool) -> ODEResult:
    """One solve over [0, 1] of the whole `x0`; dopri5 with one error norm for all its elements."""
    if solver != "dopri5":
        return _solve_fixed(velocity_fn, x0, args, solver, num_steps, save_intermediates)
    # Dopri5 is FSAL and otherwise evaluates v(0, x0) inside its first step, again after each
    # rejection of that step. Evaluating it once here and passing it as the solver state
    # (first_step=False, f0) makes every attempted step cost exactly 6 evaluations.
    f0 = velocity_fn(jnp.zeros(()), x0, args)
    f0 = jax.tree.map(lambda f, x: jnp.asarray(f, x.dtype), f0, x0)
    sol = diffrax.diffeqsolve(
        diffrax.ODETerm(velocity_fn), diffrax.Dopri5(), t0=0.0, t1=1.0, dt0=dt0, y0=x0, args=args,
        saveat=_save_at(save_intermediates), max_steps=max_steps, throw=throw,
        stepsize_controller=diffrax.PIDController(rtol=rtol, atol=atol),
        solver_state=(jnp.array(False), f0))

    x1 = jax.tree.map(lambda y: y[-1], sol.ys)
    steps = jnp.asarray(sol.stats["num_steps"], jnp.int32)
    stats = {
        "nfe": 1 + 6 * steps,
        "num_steps": steps,
        "num_accepted_steps": jnp.asarray(sol.stats["num_accepted_steps"], jnp.int32),
        "num_rejected_steps": jnp.asarray(sol.stats["num_rejected_steps"], jnp.int32),
        # 1 if the solve reached t = 1 (only informative with throw=False)
        "success": jnp.asarray(sol.result == diffrax.RESULTS.successful, jnp.int32),
    }
    return ODEResult(x1, stats, sol.ys if save_intermediates > 0 else None)


def integrate(velocity_fn: VelocityFn, x0: PyTree, *, save_intermediates: int = 0,
              per_sample: bool = False, throw: bool = True, args: Any = None,
              args_axes: Any = None, **options: Any) -> ODEResult:
    """Integrate `dx/dt = velocity_fn(t, x, args)` from t=0 (x = x0) to t=1.

    Args:
      velocity_fn: `(t, x, args) -> dx/dt`; t a scalar array, x like x0 (B, ...), output like x.
      x0: array or pytree of arrays with a leading batch axis, e.g. (B, H, W, C).
      save_intermediates: K > 0 also returns the states at K + 1 evenly spaced times in [0, 1].
      per_sample: vmap the solve over the batch axis so that each sample gets its own adaptive
        steps; `stats` entries then have shape (B,). The batched loop runs until the slowest sample
        is done, so the compute cost follows `stats["nfe"].max()` batched evaluations.
      throw: raise on solver failure (dopri5 reaching max_steps) instead of returning garbage;
        fixed-step solvers cannot fail and ignore it.
      args: passed through to `velocity_fn` (e.g. network params and conditioning).
      args_axes: with `per_sample`, which leaves of `args` are batched along axis 0 (a prefix
        tree of 0 / None, as `jax.vmap`'s in_axes; default: none), e.g. `(None, 0)` for
        `args = (params, context)`.
      **options: fields of `SolverOptions` (solver, num_steps, num_points, rtol, atol, dt0,
        max_steps);
        unset ones take the table's defaults. "dopri5" is adaptive; the others take `num_steps`
        equal steps. The reference's `linspace(0, 1, N)` time points are `num_steps = N - 1`.
        diffrax 0.7.2 given dt0=None also starts at 0.01; torchdiffeq instead estimates it from
        2 extra evaluations.

    Returns:
      ODEResult(x1, stats, intermediates); see `ODEResult`. Under `jax.jit`, keep the options,
      `save_intermediates`, `per_sample` and `throw` static (close over them); x0 and args may
      be traced. Called outside jit, the compiled solve is cached per `velocity_fn` object: reuse
      one function and pass changing arrays (params, conditioning) through `args`.
    """
    o = SolverOptions(**options)
    _check_options(o, save_intermediates)
    # Arrays, not Python floats: diffrax's filter_jit would otherwise recompile for each value.
    static = dict(solver=o.solver, num_steps=fixed_steps(o.num_steps, o.num_points), rtol=jnp.asarray(o.rtol),
                  atol=jnp.asarray(o.atol), dt0=jnp.asarray(o.dt0), max_steps=int(o.max_steps),
                  save_intermediates=int(save_intermediates), throw=throw)
    if not per_sample:
        return _solve(velocity_fn, x0, args, **static)

    def solve_one(x: PyTree, a: Any) -> ODEResult:
        # Give velocity_fn a batch of one, so it always sees (b, ...) inputs.
        one = lambda tree: jax.tree.map(lambda v: v[None], tree)
        a = jax.tree.map(lambda axis, sub: sub if axis is None else one(sub), args_axes, a,
                         is_leaf=lambda v: v is None)
        res = _solve(velocity_fn, one(x), a, **static)
        inter = res.intermediates
        if inter is not None:
            inter = jax.tree.map(lambda v: v[:, 0], inter)
        return ODEResult(jax.tree.map(lambda v: v[0], res.x1), res.stats, inter)

    res = jax.vmap(solve_one, in_axes=(0, args_axes))(x0, args)
    inter = res.intermediates
    if inter is not None:  # vmap puts the batch axis first: (B, K + 1, ...) -> (K + 1, B, ...).
        inter = jax.tree.map(lambda v: jnp.swapaxes(v, 0, 1), inter)
    return ODEResult(res.x1, res.stats, inter)
