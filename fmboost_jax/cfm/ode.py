"""ODE integration of a flow velocity field from t=0 to t=1 with diffrax.

`integrate(velocity_fn, x0, ...)` solves `dx/dt = velocity_fn(t, x, args)` on [0, 1] and returns an
`ODEResult(x1, stats, intermediates)`. `x0` is an array or pytree of arrays whose leaves share a
leading batch axis, e.g. latents (B, H, W, C).

Step convention: `num_steps` is the number of integration steps (intervals) of the fixed-step
solvers, on the grid `linspace(0, 1, num_steps + 1)`. The reference instead passes
`t = linspace(0, 1, N)` time *points* to torchdiffeq, i.e. N - 1 steps: its validation sampler
("rk4" with 40 points, 39 * 4 = 156 network evaluations) is `solver="rk4", num_steps=39` here, or
in the reference's terms `num_points=40` (when set, `num_points` replaces `num_steps`).

Solvers: "rk4" is torchdiffeq's (the 3/8 rule), "rk4_classic" the 1/6-1/3-1/3-1/6 rule.
Evaluations per step: euler 1, heun 2, midpoint 2, rk4 and rk4_classic 4. dopri5 is FSAL:
1 evaluation at t=0, then 6 per attempted (accepted or rejected) step: nfe = 1 + 6 * num_steps.

Batch semantics of dopri5: by default one error norm (RMS over every element of the whole batch)
drives a single step-size sequence shared by all samples, diffrax's default. With
`per_sample=True` the solve is vmapped over the batch axis, so each sample gets its own step sizes
and its own stats; `velocity_fn` still receives batched inputs, with batch size 1 per sample.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar, NamedTuple

import diffrax
import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array
PyTree = Any
VelocityFn = Callable[[Array, PyTree, Any], PyTree]

SOLVERS = ("dopri5", "euler", "heun", "midpoint", "rk4", "rk4_classic")
# Velocity evaluations per step of the fixed-step solvers.
EVALS_PER_STEP = {"euler": 1, "heun": 2, "midpoint": 2, "rk4": 4, "rk4_classic": 4}


class SolverOptions(NamedTuple):
    """The one table of sampler defaults (`config.sampling` is made from it): the reference's
    validation sampler, torchdiffeq's rk4 over 40 time points, and its dopri5 tolerances."""
    solver: str = "rk4"
    num_steps: int = 39
    num_points: int = 0                # > 0: the reference's time points, num_steps = N - 1
    rtol: float = 1e-3
    atol: float = 1e-6
    dt0: float = 0.01
    max_steps: int = 4096


class _HermiteERK(diffrax.AbstractERK):
    """A fixed-step 4-stage explicit Runge-Kutta rule without an embedded error estimate.

    The dense output is the cubic Hermite interpolant on (y0, k1, y1, k4), a 3rd-order
    continuous extension of either 4th-order rule below."""

    interpolation_cls: ClassVar[Callable[..., diffrax.AbstractLocalInterpolation]] = (
        diffrax.ThirdOrderHermitePolynomialInterpolation.from_k)

    def order(self, terms: Any) -> int:
        del terms
        return 4


class _RK4ThreeEighths(_HermiteERK):
    """torchdiffeq's `rk4` (its `rk4_alt_step_func`), the reference's validation sampler: Kutta's
    3/8 rule, stages at t, t + h/3, t + 2h/3, t + h with weights 1/8, 3/8, 3/8, 1/8."""

    tableau: ClassVar[diffrax.ButcherTableau] = diffrax.ButcherTableau(
        c=np.array([1 / 3, 2 / 3, 1.0]),
        b_sol=np.array([1 / 8, 3 / 8, 3 / 8, 1 / 8]),
        b_error=np.zeros(4),
        a_lower=(np.array([1 / 3]), np.array([-1 / 3, 1.0]), np.array([1.0, -1.0, 1.0])),
    )


class _ClassicRK4(_HermiteERK):
    """The classic 4th-order Runge-Kutta rule (1/6, 1/3, 1/3, 1/6)."""

    tableau: ClassVar[diffrax.ButcherTableau] = diffrax.ButcherTableau(
        c=np.array([0.5, 0.5, 1.0]),
        b_sol=np.array([1 / 6, 1 / 3, 1 / 3, 1 / 6]),
        b_error=np.zeros(4),
        a_lower=(np.array([0.5]), np.array([0.0, 0.5]), np.array([0.0, 0.0, 1.0])),
    )


_FIXED_SOLVERS: dict[str, Callable[[], diffrax.AbstractSolver]] = {
    "euler": diffrax.Euler, "heun": diffrax.Heun, "midpoint": diffrax.Midpoint,
    "rk4": _RK4ThreeEighths, "rk4_classic": _ClassicRK4}


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
        raise ValueError(f"num_points must be 0 (unset) or >= 2, got {num_points}")
    return int(num_points) - 1 if num_points else int(num_steps)


def _check_options(o: SolverOptions, save_intermediates: int) -> None:
    if o.solver not in SOLVERS:
        raise ValueError(f"Unknown ODE solver {o.solver!r}; valid solvers are {', '.join(SOLVERS)}")
    fixed_steps(o.num_steps, o.num_points)
    for name, value, low in (("num_steps", o.num_steps, 1), ("max_steps", o.max_steps, 1),
                             ("save_intermediates", save_intermediates, 0)):
        if int(value) < low:
            raise ValueError(f"{name} must be >= {low}, got {value}")
    if o.dt0 is None or (isinstance(o.dt0, (int, float)) and not o.dt0 > 0):
        raise ValueError(f"dt0 must be > 0, got {o.dt0}")


def _save_at(save_intermediates: int) -> diffrax.SaveAt:
    """x1 only, or x0, the interior points of linspace(0, 1, K + 1), and x1 (exact at both ends)."""
    if save_intermediates == 0:
        return diffrax.SaveAt(t1=True)
    interior = jnp.linspace(0.0, 1.0, save_intermediates + 1)[1:-1]
    return diffrax.SaveAt(t0=True, ts=interior if save_intermediates > 1 else None, t1=True)


# filter_jit: one compiled program per static configuration (solver, num_steps, ...), also when
# `integrate` is called eagerly; inside an outer jit it is inlined.
@eqx.filter_jit
def _solve(velocity_fn: VelocityFn, x0: PyTree, args: Any, *, solver: str, num_steps: int,
           rtol: Array, atol: Array, dt0: Array, max_steps: int, save_intermediates: int,
           throw: bool) -> ODEResult:
    """One diffrax solve over [0, 1] of the whole `x0` (one error norm for all its elements)."""
    solver_state = None
    if solver == "dopri5":
        diffrax_solver: diffrax.AbstractSolver = diffrax.Dopri5()
        controller: diffrax.AbstractStepSizeController = diffrax.PIDController(rtol=rtol, atol=atol)
        step0: Array | None = dt0
        # Dopri5 is FSAL and otherwise evaluates v(0, x0) inside its first step, again after each
        # rejection of that step. Evaluating it once here and passing it as the solver state
        # (first_step=False, f0) makes every attempted step cost exactly 6 evaluations.
        f0 = velocity_fn(jnp.zeros(()), x0, args)
        f0 = jax.tree.map(lambda f, x: jnp.asarray(f, x.dtype), f0, x0)
        solver_state = (jnp.array(False), f0)
    else:
        diffrax_solver = _FIXED_SOLVERS[solver]()
        # An exact grid, like the reference's linspace, instead of accumulating t += dt.
        # JAX's default float: float32, or float64 under jax_enable_x64.
        grid = np.linspace(0.0, 1.0, num_steps + 1).astype(jax.dtypes.canonicalize_dtype(float))
        controller = diffrax.StepTo(ts=grid)
        step0 = None
        max_steps = num_steps
        # A fixed grid cannot run out of steps, and with a concrete grid (numpy, above) and no
        # throw the program holds no host callbacks, so that it can be compiled once and cached
        # (`fmboost_jax.compile_cache`).
        throw = False

    sol = diffrax.diffeqsolve(
        diffrax.ODETerm(velocity_fn), diffrax_solver, t0=0.0, t1=1.0, dt0=step0, y0=x0, args=args,
        saveat=_save_at(save_intermediates), stepsize_controller=controller, max_steps=max_steps,
        throw=throw, solver_state=solver_state)

    x1 = jax.tree.map(lambda y: y[-1], sol.ys)
    intermediates = sol.ys if save_intermediates > 0 else None

    steps = jnp.asarray(sol.stats["num_steps"], jnp.int32)
    if solver == "dopri5":
        nfe = 1 + 6 * steps
    else:
        nfe = EVALS_PER_STEP[solver] * steps
    stats = {
        "nfe": jnp.asarray(nfe, jnp.int32),
        "num_steps": steps,
        "num_accepted_steps": jnp.asarray(sol.stats["num_accepted_steps"], jnp.int32),
        "num_rejected_steps": jnp.asarray(sol.stats["num_rejected_steps"], jnp.int32),
        # 1 if the solve reached t = 1 (only informative with throw=False)
        "success": jnp.asarray(sol.result == diffrax.RESULTS.successful, jnp.int32),
    }
    return ODEResult(x1, stats, intermediates)


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
