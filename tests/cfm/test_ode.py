"""Tests for fmboost_jax/ode.py.

Every diffrax configuration costs about 2 s to trace and compile on 2 CPU cores, so the tests share
one module-level field whose coefficients travel in `args` (as arrays, hence traced): the same
compiled solve serves the convergence, NFE and linear-flow checks.
"""

from __future__ import annotations

import functools
import re

import diffrax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fmboost_jax.cfm.ode import EVALS_PER_STEP, SOLVERS, integrate

FIXED = ("euler", "heun", "midpoint", "rk4", "rk4_classic")
ORDER = {"euler": 1, "heun": 2, "midpoint": 2, "rk4": 4, "rk4_classic": 4}
BASE_STEPS = {"euler": 16, "heun": 8, "midpoint": 16, "rk4": 16, "rk4_classic": 8}

_calls = [0]


def _count() -> None:
    _calls[0] += 1


def field(t: jax.Array, x: jax.Array, args: tuple) -> jax.Array:
    """v = span * (a cos(s) x + b) at s = start + span * t, i.e. the affine field
    `dx/ds = a cos(s) x + b` on [start, start + span] mapped onto t in [0, 1]. Counts its calls."""
    a, b, start, span = args
    jax.debug.callback(_count)
    s = start + span * t
    return span * (a * jnp.cos(s) * x + b)


def make_args(x0: jax.Array, a: float = 1.0, b: jax.Array | None = None, start: float = 0.0,
              span: float = 1.0) -> tuple:
    b = jnp.zeros_like(x0) if b is None else b
    return (jnp.asarray(a, x0.dtype), b, jnp.asarray(start, x0.dtype), jnp.asarray(span, x0.dtype))


def count_calls(fn):
    """Run fn() and return (its result, the number of `field` evaluations it made)."""
    _calls[0] = 0
    out = jax.block_until_ready(fn())
    jax.effects_barrier()
    return out, _calls[0]


def solve_chained(solver: str, num_steps: int, pieces: int, x0: jax.Array) -> jax.Array:
    """`pieces` consecutive solves of [i/pieces, (i+1)/pieces] with num_steps each: the same grid
    and stages as one solve with num_steps * pieces steps, but a single compiled program."""
    x = x0
    for i in range(pieces):
        args = make_args(x0, start=i / pieces, span=1.0 / pieces)
        x = integrate(field, x, solver=solver, num_steps=num_steps, args=args).x1
    return x


def x0_small() -> jax.Array:
    return jnp.array([[1.0, -0.5, 0.25], [2.0, 0.3, -1.5]])


def exact_solution(x0: jax.Array) -> jax.Array:
    """Solution at t=1 of dx/dt = cos(t) x."""
    return x0 * jnp.exp(jnp.sin(1.0))


@pytest.mark.parametrize("solver", FIXED)
def test_fixed_step_solver_converges_at_its_theoretical_order(solver):
    with jax.enable_x64(True):
        x0 = x0_small()
        n = BASE_STEPS[solver]
        errors = [float(jnp.max(jnp.abs(solve_chained(solver, n, p, x0) - exact_solution(x0))))
                  for p in (1, 2, 4)]
        orders = np.log2(np.array(errors[:-1]) / np.array(errors[1:]))
        print(f"{solver}: steps {n}, {2 * n}, {4 * n} errors {errors} observed orders {orders}")
        assert np.all(np.abs(orders - ORDER[solver]) < 0.3), (errors, orders)


def torchdiffeq_rk4_step(f, t0: float, dt: float, y0: np.ndarray) -> np.ndarray:
    """One step of torchdiffeq's `rk4` (its `rk4_alt_step_func`, Kutta's 3/8 rule), written out."""
    k1 = f(t0, y0)
    k2 = f(t0 + dt / 3, y0 + dt * k1 / 3)
    k3 = f(t0 + dt * 2 / 3, y0 + dt * (k2 - k1 / 3))
    k4 = f(t0 + dt, y0 + dt * (k1 - k2 + k3))
    return y0 + (k1 + 3 * (k2 + k3) + k4) * dt * 0.125


def test_rk4_is_the_references_three_eighths_rule_and_rk4_classic_is_not():
    with jax.enable_x64(True):
        x0 = x0_small()
        args = make_args(x0, b=jnp.full_like(x0, 0.5))
        f = lambda t, y: np.asarray(field(jnp.asarray(t), jnp.asarray(y), args))
        y = np.asarray(x0)
        for i in range(3):                        # 3 steps on the grid linspace(0, 1, 4)
            y = torchdiffeq_rk4_step(f, i / 3, 1 / 3, y)
        ours = integrate(field, x0, solver="rk4", num_steps=3, args=args).x1
        classic = integrate(field, x0, solver="rk4_classic", num_steps=3, args=args).x1
        np.testing.assert_allclose(ours, y, rtol=1e-13, atol=1e-13)
        assert float(jnp.max(jnp.abs(classic - y))) > 1e-6


def test_chained_sub_interval_solves_equal_one_solve_with_more_steps():
    with jax.enable_x64(True):
        x0 = x0_small()
        chained = solve_chained("rk4", 8, 2, x0)
        direct = integrate(field, x0, solver="rk4", num_steps=16, args=make_args(x0)).x1
        np.testing.assert_allclose(chained, direct, rtol=1e-13, atol=1e-13)


@pytest.mark.parametrize("solver", FIXED)
def test_fixed_step_nfe_equals_steps_times_evaluations_per_step(solver):
    with jax.enable_x64(True):
        x0 = x0_small()
        n = BASE_STEPS[solver]
        res, calls = count_calls(
            lambda: integrate(field, x0, solver=solver, num_steps=n, args=make_args(x0)))
        assert calls == n * EVALS_PER_STEP[solver]
        assert int(res.stats["nfe"]) == calls
        assert int(res.stats["num_steps"]) == int(res.stats["num_accepted_steps"]) == n
        assert int(res.stats["num_rejected_steps"]) == 0


@pytest.mark.parametrize("rtol,atol,dt0", [(1e-3, 1e-6, 0.01), (1e-6, 1e-9, 0.01), (1e-6, 1e-9, 0.5)])
def test_dopri5_meets_its_tolerance_and_counts_one_plus_six_evaluations_per_step(rtol, atol, dt0):
    with jax.enable_x64(True):
        x0 = x0_small()
        res, calls = count_calls(lambda: integrate(
            field, x0, solver="dopri5", rtol=rtol, atol=atol, dt0=dt0, args=make_args(x0)))
        exact = exact_solution(x0)
        err = jnp.abs(res.x1 - exact)
        stats = {k: int(v) for k, v in res.stats.items()}
        print(f"dopri5 rtol={rtol} atol={atol} dt0={dt0}: max error {float(err.max()):.2e}, {stats}")
        assert bool(jnp.all(err <= 10 * (atol + rtol * jnp.abs(exact))))
        assert stats["num_steps"] > 0
        assert stats["num_steps"] == stats["num_accepted_steps"] + stats["num_rejected_steps"]
        assert calls == stats["nfe"] == 1 + 6 * stats["num_steps"]
        if dt0 == 0.5:  # A too large first step is rejected and still costs 6, not 7.
            assert stats["num_rejected_steps"] > 0


@pytest.mark.parametrize("solver", SOLVERS)
def test_every_solver_maps_x0_to_x1_exactly_along_a_straight_flow(solver):
    with jax.enable_x64(True):
        x0 = x0_small()
        x1_target = jnp.array([[0.5, 1.0, -2.0], [-1.0, 0.0, 3.0]])
        args = make_args(x0, a=0.0, b=x1_target - x0)
        res = integrate(field, x0, solver=solver, num_steps=BASE_STEPS.get(solver, 40), args=args)
        np.testing.assert_allclose(res.x1, x1_target, rtol=0, atol=1e-12)


def test_intermediates_run_from_x0_to_x1_at_evenly_spaced_times():
    x0 = x0_small().astype(jnp.float32)
    res = integrate(field, x0, solver="rk4", num_steps=6, save_intermediates=4,
                    args=make_args(x0))
    assert res.intermediates.shape == (5, *x0.shape)
    np.testing.assert_array_equal(res.intermediates[0], x0)
    np.testing.assert_array_equal(res.intermediates[-1], res.x1)
    # t = 0.25 is inside a step (6 steps): read from the dense output, still close to exact.
    ts = jnp.linspace(0.0, 1.0, 5)[:, None, None]
    np.testing.assert_allclose(res.intermediates, x0 * jnp.exp(jnp.sin(ts)), rtol=1e-4)


def test_integrate_works_under_jit_and_vmap():
    with jax.enable_x64(True):
        x0 = x0_small()
        xs = jnp.stack([x0, -2.0 * x0])
        args = make_args(x0)

        @jax.jit
        def solve_all(xs):
            return jax.vmap(lambda x: integrate(field, x, solver="rk4", num_steps=8, args=args))(xs)

        res = solve_all(xs)
        assert res.x1.shape == xs.shape and res.stats["nfe"].shape == (2,)
        for i in range(2):
            one = integrate(field, xs[i], solver="rk4", num_steps=8, args=args)
            np.testing.assert_allclose(res.x1[i], one.x1, rtol=1e-12)
            assert int(res.stats["nfe"][i]) == 32


def test_per_sample_dopri5_gives_each_sample_its_own_steps():
    with jax.enable_x64(True):
        # Sample 0 lies below atol, so it needs fewer steps than sample 1 at the same tolerance.
        x0 = jnp.array([[1e-12, -2e-12, 1e-12], [2.0, 0.3, -1.5]])
        args = make_args(x0[:1])
        tol = dict(rtol=1e-6, atol=1e-9)
        res = integrate(field, x0, solver="dopri5", per_sample=True, save_intermediates=2,
                        args=args, **tol)
        assert res.stats["nfe"].shape == (2,)
        assert res.intermediates.shape == (3, *x0.shape)
        np.testing.assert_array_equal(res.intermediates[0], x0)
        np.testing.assert_array_equal(res.intermediates[-1], res.x1)
        print("per-sample dopri5 stats:", {k: v.tolist() for k, v in res.stats.items()})
        assert int(res.stats["num_steps"][0]) < int(res.stats["num_steps"][1])
        for i in range(2):
            alone = integrate(field, x0[i:i + 1], solver="dopri5", args=args, **tol)
            np.testing.assert_allclose(res.x1[i], alone.x1[0], rtol=1e-12, atol=1e-20)
            for key, value in alone.stats.items():
                assert int(res.stats[key][i]) == int(value), key


def test_unknown_solver_name_error_lists_the_valid_solvers():
    x0 = jnp.zeros((1, 2))
    with pytest.raises(ValueError) as info:
        integrate(field, x0, solver="rk45")
    for name in SOLVERS:
        assert name in str(info.value)


@pytest.mark.parametrize("kwargs", [dict(num_steps=0), dict(save_intermediates=-1),
                                    dict(max_steps=0), dict(dt0=0.0), dict(dt0=None)])
def test_invalid_step_settings_raise(kwargs):
    with pytest.raises(ValueError):
        integrate(field, jnp.zeros((1, 2)), solver="euler", **kwargs)


@pytest.mark.parametrize("solver", FIXED + ("dopri5",))
def test_fixed_step_programs_hold_no_host_callbacks_so_the_compile_cache_keeps_them(solver):
    # JAX's persistent cache skips programs whose lowering holds host callbacks (diffrax's
    # runtime checks are such, even where XLA later removes them as dead code).
    x0 = jnp.ones((2, 3))
    velocity = lambda t, x, a: a * jnp.cos(t) * x        # `field` counts its calls by a callback
    for intermediates in (0, 3):
        fn = jax.jit(functools.partial(integrate, velocity, solver=solver, num_steps=3,
                                       save_intermediates=intermediates))
        text = fn.lower(x0, args=jnp.float32(0.5)).as_text()
        targets = re.findall(r"custom_call @(\w+)", text)
        assert any("callback" in t for t in targets) == (solver == "dopri5"), (solver, targets)


class _RK4ThreeEighths(diffrax.AbstractERK):
    tableau = diffrax.ButcherTableau(
        c=np.array([1 / 3, 2 / 3, 1.0]), b_sol=np.array([1 / 8, 3 / 8, 3 / 8, 1 / 8]),
        b_error=np.zeros(4),
        a_lower=(np.array([1 / 3]), np.array([-1 / 3, 1.0]), np.array([1.0, -1.0, 1.0])))
    interpolation_cls = diffrax.ThirdOrderHermitePolynomialInterpolation.from_k

    def order(self, terms):
        return 4


class _ClassicRK4(_RK4ThreeEighths):
    tableau = diffrax.ButcherTableau(
        c=np.array([0.5, 0.5, 1.0]), b_sol=np.array([1 / 6, 1 / 3, 1 / 3, 1 / 6]),
        b_error=np.zeros(4),
        a_lower=(np.array([0.5]), np.array([0.0, 0.5]), np.array([0.0, 0.0, 1.0])))


DIFFRAX = {"euler": diffrax.Euler, "heun": diffrax.Heun, "midpoint": diffrax.Midpoint,
           "rk4": _RK4ThreeEighths, "rk4_classic": _ClassicRK4}


@pytest.mark.parametrize("solver", FIXED)
def test_fixed_step_rules_and_their_dense_output_match_diffrax(solver):
    # diffrax as the oracle: the same tableau on the same grid, and its dense interpolation at
    # saved times that fall inside steps (5 steps, 3 saved intervals).
    with jax.enable_x64(True):
        x0 = x0_small()
        velocity = lambda t, x, a: a * jnp.cos(2 * t) * x + jnp.sin(3 * t)
        ours = integrate(velocity, x0, solver=solver, num_steps=5, save_intermediates=3,
                         args=jnp.float64(1.3))
        sol = diffrax.diffeqsolve(
            diffrax.ODETerm(velocity), DIFFRAX[solver](), t0=0.0, t1=1.0, dt0=None, y0=x0,
            args=jnp.float64(1.3), stepsize_controller=diffrax.StepTo(ts=np.linspace(0, 1, 6)),
            saveat=diffrax.SaveAt(ts=np.linspace(0, 1, 4)))
        np.testing.assert_allclose(ours.intermediates, sol.ys, rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(ours.x1, sol.ys[-1], rtol=1e-12, atol=1e-12)
        assert float(jnp.max(jnp.abs(ours.intermediates[1] - x0))) > 1e-3
