"""Where the CPU training step's time goes: every convolution of the UNet, timed alone, against
PyTorch's, next to the whole step of both, in the same run.

    python benchmarks/conv_profile.py                 # ref15m, batch 8, 32x32 latents
    FMBOOST_XLA_CPU=off python benchmarks/conv_profile.py   # XLA's default CPU kernels

The convolutions are read off the traced network (`conv_general_dilated` in its jaxpr). Each
distinct shape is timed as three jitted programs, the forward (y = conv(x, k)), the input
gradient (dx) and the weight gradient (dW), and in PyTorch as `conv2d` and
`convolution_backward` on the same shapes (NCHW, the same threads); the totals weight every shape
by its count in the network. The whole steps come from `bench_unet_step.py`'s `make_unet_step`
and its PyTorch oracle. What the step spends outside the convolutions is the step minus the
convolution total; the last line compares that split between the two frameworks.
"""

from __future__ import annotations

import argparse
import collections
import os
import statistics
import sys
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import bench_unet_step as bench  # noqa: E402
from machine import describe  # noqa: E402

from fmboost_jax.config import base_config  # noqa: E402
from fmboost_jax.models.unet import EfficientUNet  # noqa: E402

Conv = tuple[tuple[int, ...], tuple[int, ...], int, str]   # x shape, kernel shape, stride, padding


def network_convs(model: EfficientUNet, batch: int, size: int) -> collections.Counter[Conv]:
    """The forward pass's convolutions, by (x shape, kernel shape (HWIO), stride, padding)."""
    x = jnp.zeros((batch, size, size, 4))
    params = jax.eval_shape(model.init, jax.random.PRNGKey(0), x, jnp.zeros((batch,)), x)
    jaxpr = jax.make_jaxpr(lambda p: model.apply(p, x, jnp.zeros((batch,)), x))(params)
    convs: collections.Counter[Conv] = collections.Counter()
    for eqn in jaxpr.jaxpr.eqns:
        if eqn.primitive.name != "conv_general_dilated":
            continue
        lhs, rhs = (v.aval.shape for v in eqn.invars)
        stride = eqn.params["window_strides"][0]
        pad = eqn.params["padding"][0]
        convs[(tuple(lhs), tuple(rhs), stride, f"{pad[0]},{pad[1]}")] += 1
    return convs


def jax_conv_times(conv: Conv, steps: int) -> tuple[float, float, float]:
    """Median ms of the jitted forward, input gradient and weight gradient of one convolution."""
    xs, ks, stride, pad = conv
    lo, hi = (int(p) for p in pad.split(","))
    rng = np.random.default_rng(0)
    x, k = (jnp.asarray(rng.normal(size=s), jnp.float32) for s in (xs, ks))

    def f(x, k):
        return jax.lax.conv_general_dilated(x, k, (stride, stride), ((lo, hi), (lo, hi)),
                                            dimension_numbers=("NHWC", "HWIO", "NHWC"))

    dy = jnp.asarray(rng.normal(size=jax.eval_shape(f, x, k).shape), jnp.float32)
    fwd = jax.jit(f)
    dx = jax.jit(lambda x, k, dy: jax.vjp(f, x, k)[1](dy)[0])
    dw = jax.jit(lambda x, k, dy: jax.vjp(f, x, k)[1](dy)[1])
    calls = (lambda: fwd(x, k).block_until_ready(), lambda: dx(x, k, dy).block_until_ready(),
             lambda: dw(x, k, dy).block_until_ready())
    return tuple(statistics.median(bench.time_calls(c, steps)) for c in calls)


def torch_conv_times(conv: Conv, steps: int) -> tuple[float, float, float]:
    """The same three calls in PyTorch (`conv2d`, `convolution_backward` for dx and for dW)."""
    import torch
    xs, ks, stride, pad = conv
    lo, hi = (int(p) for p in pad.split(","))
    rng = np.random.default_rng(0)
    x = torch.tensor(rng.normal(size=xs).transpose(0, 3, 1, 2), dtype=torch.float32)
    k = torch.tensor(rng.normal(size=ks).transpose(3, 2, 0, 1), dtype=torch.float32)
    xp = torch.nn.functional.pad(x, (lo, hi, lo, hi)) if lo != hi else x
    padding = [lo, lo] if lo == hi else [0, 0]
    y = torch.nn.functional.conv2d(xp, k, stride=stride, padding=padding)
    dy = torch.randn_like(y)

    def backward(mask: list[bool]) -> Any:
        return torch.ops.aten.convolution_backward(dy, xp, k, None, [stride] * 2, padding, [1, 1],
                                                   False, [0, 0], 1, mask)

    calls = (lambda: torch.nn.functional.conv2d(xp, k, stride=stride, padding=padding),
             lambda: backward([True, False, False]), lambda: backward([False, True, False]))
    with torch.no_grad():
        return tuple(statistics.median(bench.time_calls(c, steps)) for c in calls)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", choices=sorted(bench.CONFIGS), default="ref15m")
    p.add_argument("--batch", type=int, default=None, help="default: the config's")
    p.add_argument("--steps", type=int, default=10, help="timed calls per program")
    p.add_argument("--torch-threads", type=int, default=os.cpu_count())
    args = p.parse_args()

    import torch
    torch.set_num_threads(args.torch_threads)
    changes, default_batch, size = bench.CONFIGS[args.config]
    batch = args.batch or default_batch
    cfg = base_config().unet
    cfg.update(changes)
    model = EfficientUNet.from_config(cfg)
    print(describe())
    print(f"config: {args.config} batch={batch} size={size}x{size}, float32; ms per call "
          f"(median of {args.steps}); jax / torch")

    totals = np.zeros((2, 3))
    for conv, count in sorted(network_convs(model, batch, size).items(), key=lambda c: -c[0][0][1]):
        j, t = jax_conv_times(conv, args.steps), torch_conv_times(conv, args.steps)
        totals += count * np.array([j, t])
        xs, ks, stride, _ = conv
        name = f"{xs[1]}x{xs[2]} {ks[2]}->{ks[3]} k{ks[0]} s{stride}"
        print(f"{name:24s} x{count:<2d} fwd {j[0]:6.2f} / {t[0]:6.2f}  dx {j[1]:6.2f} / {t[1]:6.2f}"
              f"  dW {j[2]:6.2f} / {t[2]:6.2f}", flush=True)
    (jf, jdx, jdw), (tf, tdx, tdw) = totals
    print(f"convolutions, weighted: fwd {jf:.1f} / {tf:.1f} ms ({jf / tf:.2f})  dx {jdx:.1f} / "
          f"{tdx:.1f} ({jdx / tdx:.2f})  dW {jdw:.1f} / {tdw:.1f} ({jdw / tdw:.2f})")

    step_j, fwd_j, step_t, fwd_t = whole_steps(model, cfg, batch, size, args.steps)
    conv_j, conv_t = jf + jdx + jdw, tf + tdx + tdw
    print(f"step: jax {step_j:.1f} ms = convolutions {conv_j:.1f} + rest {step_j - conv_j:.1f}; "
          f"torch {step_t:.1f} ms = convolutions {conv_t:.1f} + rest {step_t - conv_t:.1f}")
    print(f"forward: jax {fwd_j:.1f} ms = convolutions {jf:.1f} + rest {fwd_j - jf:.1f}; "
          f"torch {fwd_t:.1f} ms = convolutions {tf:.1f} + rest {fwd_t - tf:.1f}")
    print(f"gap (jax - torch): step {step_j - step_t:+.1f} ms, of which convolutions "
          f"{conv_j - conv_t:+.1f} and the rest {(step_j - conv_j) - (step_t - conv_t):+.1f}")


def whole_steps(model: EfficientUNet, cfg: Any, batch: int, size: int, steps: int
                ) -> tuple[float, float, float, float]:
    """Median ms of the training step and the forward pass, JAX then PyTorch (same weights)."""
    import optax
    data = bench.make_batch(jax.random.PRNGKey(1), batch, size, jnp.float32)
    params = jax.jit(model.init)(jax.random.PRNGKey(0), data["x_t"], data["t"], data["context"])
    tx = optax.adam(1e-4)
    step = jax.jit(bench.make_unet_step(model, tx))
    forward = jax.jit(lambda p: model.apply(p, data["x_t"], data["t"], data["context"]))
    state = [(params, tx.init(params))]

    def run_step():
        state[0], loss = step(state[0], data)
        loss.block_until_ready()

    step_j = statistics.median(bench.time_calls(run_step, steps))
    fwd_j = statistics.median(bench.time_calls(lambda: forward(params).block_until_ready(), steps))
    numpy_batch = {k: np.asarray(v) for k, v in data.items()}
    import torch
    train_t, fwd_t = bench.torch_times(dict(cfg), numpy_batch, steps, torch.get_num_threads())
    return step_j, fwd_j, statistics.median(train_t), statistics.median(fwd_t)


if __name__ == "__main__":
    main()
