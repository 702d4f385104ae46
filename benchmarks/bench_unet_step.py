"""Benchmark the EfficientUNet training step (forward + backward + Adam) and forward pass.

    python benchmarks/bench_unet_step.py --config ref15m --torch-baseline
    python benchmarks/bench_unet_step.py --config released --batch 4 --dtype bfloat16
    python benchmarks/bench_unet_step.py --config ref15m --devices 1,8     # data-parallel scaling

Times compiled steps after warm-up and prints median/mean ms, images/s, peak memory,
TFLOP/s and the fraction of the device's peak on an accelerator, the machine, and the ratio
to a reference time (`--reference-ms`, default: the PyTorch reference's 768 ms per training
step of `ref15m` on the project's 2-core CPU machine kind; see shared/REFERENCE.md).
`--torch-baseline` also times the PyTorch oracle (`tests/torch_unet_oracle.py`) in the same
run, on the same inputs, and reports the ratio against that, and the reference's sampler
(`torchdiffeq.odeint` with the same solver and steps, on the oracle with the JAX weights) against
the JAX sample call (skipped, in one line, without torchdiffeq). `--devices 1,8` times the
data-parallel step of the same global batch on 1 and on 8 devices (8 fake CPU devices on a
CPU host, the first 8 accelerators otherwise), one process per count, and prints the ratio.

The timed step comes from `make_unet_step`; to benchmark the real trainer's step instead,
swap in a function with the same signature `step(state, batch) -> (state, loss)`.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT))
from arguments import numbers  # noqa: E402  (benchmarks/ is on sys.path)
from machine import describe  # noqa: E402

from fmboost_jax.cfm import ode  # noqa: E402
from fmboost_jax.config import base_config  # noqa: E402
from fmboost_jax.models.layers import count_params  # noqa: E402
from fmboost_jax.models.unet import EfficientUNet  # noqa: E402
from fmboost_jax.parallel import sharding  # noqa: E402
from fmboost_jax.train.meter import flops_of, peak_tflops  # noqa: E402

# name -> (changes to the released UNet, default batch, default latent size). Latents have 4
# channels and the context (the up-sampled low-res latent) 4 more, so in_channels = 8.
CONFIGS: dict[str, tuple[dict[str, Any], int, int]] = {
    "ref15m": (dict(model_channels=64, num_res_blocks=2, channel_mult=(1, 2, 4),
                    attention_resolutions=(4,), dim_head=32), 8, 32),
    "released": ({}, 8, 64),
}

def make_unet_step(model: EfficientUNet, tx: optax.GradientTransformation) -> Callable:
    """`step((params, opt_state), batch) -> ((params, opt_state), loss)`: the flow-matching
    regression `mean((v(x_t, t, context) - u)^2)` and one optimiser update."""

    def loss_fn(params, batch):
        v = model.apply(params, batch["x_t"], batch["t"], batch["context"])
        return jnp.mean(jnp.square(v - batch["u"]))

    def step(state, batch):
        params, opt_state = state
        loss, grads = jax.value_and_grad(loss_fn)(params, batch)
        updates, opt_state = tx.update(grads, opt_state, params)
        return (optax.apply_updates(params, updates), opt_state), loss

    return step


def make_ode_sample(model: EfficientUNet, solver: str, num_steps: int) -> Callable:
    """`sample(params, x0, context) -> ODEResult`: the flow's ODE from t=0 to 1 with the UNet
    as the velocity (the sampler's network evaluations, without coupling or decoding)."""

    def sample(params, x0, context):
        velocity = lambda t, x, args: model.apply(params, x, t, context)
        return ode.integrate(velocity, x0, solver=solver, num_steps=num_steps)

    return sample


def make_batch(rng: jax.Array, batch: int, size: int, dtype: Any) -> dict[str, jax.Array]:
    k = jax.random.split(rng, 4)
    shape = (batch, size, size, 4)
    return dict(x_t=jax.random.normal(k[0], shape, dtype), context=jax.random.normal(k[1], shape, dtype),
                t=jax.random.uniform(k[2], (batch,)), u=jax.random.normal(k[3], shape, dtype))


def time_calls(fn: Callable[[], Any], steps: int, warmup: int = 2) -> list[float]:
    """Wall-clock ms of `steps` calls of `fn` (which must block until done), after `warmup`."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return times


def peak_memory_mb(device: Any) -> float:
    if device.platform == "cpu":  # process max RSS (kB on Linux)
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    stats = device.memory_stats() or {}
    return stats.get("peak_bytes_in_use", 0) / 2**20


def summary(name: str, times: list[float], batch: int, flops: float | None, peak: float | None,
            accelerator: bool) -> str:
    med, mean = statistics.median(times), statistics.mean(times)
    line = (f"{name:10s} median {med:9.1f} ms  mean {mean:9.1f} ms  min {min(times):9.1f} ms  "
            f"{batch / med * 1e3:8.1f} img/s")
    if flops:
        tflops = flops / (med * 1e-3) / 1e12
        line += f"  {flops / 1e9:8.1f} GFLOP  {tflops:7.3f} TFLOP/s"
        if accelerator and peak:
            line += f" ({100 * tflops / peak:.1f}% of {peak:g} peak)"
    return line


def ratio_text(ours: float, ref: float, what: str) -> str:
    r = ours / ref
    speed = f"{r:.2f}x slower" if r >= 1 else f"{1 / r:.2f}x faster"
    return f"ratio vs {what}: {ours:.1f} / {ref:.1f} ms = {r:.3f} ({speed})"


def reference_args(unet: dict) -> dict:
    """`config.unet` as the reference network's arguments: without `attention` and `remat`, which
    only say how fmboost_jax computes the same network."""
    return {k: v for k, v in unet.items() if k not in ("attention", "remat")}


def torch_unet_calls(cfg: dict[str, Any], batch: dict[str, np.ndarray], device: str = "cpu",
                     autocast: str | None = None) -> tuple[Callable[[], None], Callable[[], None]]:
    """The PyTorch oracle's training step (forward, backward, Adam) and forward pass on `batch`
    (NHWC arrays, moved to NCHW on `device`), each blocking until done; `autocast`: a torch dtype
    name ("bfloat16") to run under `torch.autocast`. Raises ImportError without torch."""
    import contextlib

    import torch
    sys.path.insert(0, str(ROOT / "tests"))
    from torch_unet_oracle import EfficientUNet as TorchUNet
    torch.manual_seed(0)
    dev = torch.device(device)
    model = TorchUNet(**reference_args(cfg)).to(dev)
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    nchw = lambda a: torch.from_numpy(np.array(np.moveaxis(np.asarray(a, np.float32), -1, 1))).to(dev)
    x, c, u = nchw(batch["x_t"]), nchw(batch["context"]), nchw(batch["u"])
    t = torch.from_numpy(np.array(batch["t"], np.float32)).to(dev)
    amp = (lambda: torch.autocast(dev.type, dtype=getattr(torch, autocast))) if autocast else \
        contextlib.nullcontext
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)

    def step():
        opt.zero_grad(set_to_none=True)
        with amp():
            loss = torch.mean((model(x, t, c).float() - u) ** 2)
        loss.backward()
        opt.step()
        sync()

    def forward():
        with torch.no_grad(), amp():
            model(x, t, c)
        sync()

    return step, forward


def torch_times(cfg: dict[str, Any], batch: dict[str, np.ndarray], steps: int, threads: int
                ) -> tuple[list[float], list[float]] | None:
    """Training-step and forward times of the PyTorch oracle on the same inputs (NCHW), or None."""
    try:
        import torch
        torch.set_num_threads(threads)
        step, forward = torch_unet_calls(cfg, batch)
    except ImportError as e:
        print(f"torch baseline skipped: {e}")
        return None
    return time_calls(step, steps), time_calls(forward, steps)


# fmboost_jax solver -> torchdiffeq method (torchdiffeq's rk4 is the 3/8 rule, our "rk4").
TORCHDIFFEQ_METHODS = {"euler": "euler", "midpoint": "midpoint", "heun": "heun2", "rk4": "rk4",
                       "dopri5": "dopri5"}


def torch_state_dict_from_jax(params: Any, model: EfficientUNet, input_shape: tuple[int, ...]
                              ) -> dict[str, np.ndarray]:
    """Flax UNet params -> the oracle's state dict (the inverse of `convert.unet`'s layout)."""
    from flax import traverse_util

    from fmboost_jax.convert.unet import unet_layout, unet_param_shapes
    flat = traverse_util.flatten_dict(jax.device_get(params["params"]))
    out = {}
    for path, s in traverse_util.flatten_dict(unet_param_shapes(model, input_shape)).items():
        key, torch_shape, to_flax = unet_layout(path, tuple(s.shape))
        # where each torch element lands in the flax array, then scatter it back
        index = np.asarray(to_flax(np.arange(int(np.prod(torch_shape))).reshape(torch_shape)))
        value = np.empty(int(np.prod(torch_shape)), np.float32)
        value[index.ravel()] = np.asarray(flat[path], np.float32).ravel()
        out[key] = value.reshape(torch_shape)
    return out


def torch_sample_call(cfg: dict[str, Any], state_dict: dict[str, np.ndarray], x0: np.ndarray,
                      context: np.ndarray, solver: str, num_steps: int, threads: int
                      ) -> tuple[Callable[[], Any], list[int]] | str:
    """The reference's sampler on the PyTorch oracle: `torchdiffeq.odeint(velocity, x0,
    t=linspace(0, 1, num_steps + 1), method)` (dopri5 with the sampler's rtol/atol) under
    `no_grad`, on NHWC `x0`/`context` moved to NCHW. Returns (call -> x1 NCHW, [network calls of
    the last call]), or a line saying why it cannot run."""
    try:
        import torch
        import torchdiffeq
    except ImportError as e:
        return f"torchdiffeq sampler comparison skipped: {e}"
    if solver not in TORCHDIFFEQ_METHODS:
        return f"torchdiffeq sampler comparison skipped: no torchdiffeq method for {solver!r}"
    sys.path.insert(0, str(ROOT / "tests"))
    from torch_unet_oracle import EfficientUNet as TorchUNet
    torch.set_num_threads(threads)
    net = TorchUNet(**reference_args(cfg)).eval()
    net.load_state_dict({k: torch.from_numpy(v) for k, v in state_dict.items()})
    nchw = lambda a: torch.from_numpy(np.array(np.moveaxis(np.asarray(a, np.float32), -1, 1)))
    x, c = nchw(x0), nchw(context)
    t = torch.linspace(0, 1, num_steps + 1)
    nfe = [0]
    opts = ode.SolverOptions()
    kw = dict(rtol=opts.rtol, atol=opts.atol) if solver == "dopri5" else {}

    def velocity(t, x):
        nfe[0] += 1
        return net(x, t.reshape(1).expand(x.shape[0]), c)

    def call():
        nfe[0] = 0
        with torch.no_grad():
            return torchdiffeq.odeint(velocity, x, t, method=TORCHDIFFEQ_METHODS[solver], **kw)[-1]

    return call, nfe


def compare_device_counts(args: argparse.Namespace) -> None:
    """Runs this script once per device count and prints the step times and their ratios."""
    counts = args.devices
    argv = [a for a in sys.argv[1:] if not a.startswith("--devices")]
    if "--devices" in sys.argv:  # "--devices 1,8" form
        i = sys.argv.index("--devices")
        argv = sys.argv[1:i] + sys.argv[i + 2:]
    times = {}
    for n in counts:
        env = dict(os.environ)
        env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") +
                            f" --xla_force_host_platform_device_count={n}").strip()
        proc = subprocess.run([sys.executable, __file__, *argv, f"--mesh-devices={n}"], env=env,
                              capture_output=True, text=True)
        lines = proc.stdout.splitlines()
        for line in lines:
            if line.startswith(("machine:", "config:", "train ", "compile")):
                print(f"[{n} devices] {line}")
        result = [row for row in lines if row.startswith("RESULT ")]
        if proc.returncode or not result:
            raise SystemExit(f"run on {n} devices failed:\n{proc.stderr[-3000:]}")
        times[n] = json.loads(result[0][len("RESULT "):])["median_ms"]
    base = counts[0]
    for n in counts[1:]:
        print(f"same global batch, {n} vs {base} device(s): {times[n]:.1f} / {times[base]:.1f} ms "
              f"= {times[n] / times[base]:.3f}x the time per step "
              f"(speed-up {times[base] / times[n]:.2f}x)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", choices=sorted(CONFIGS), default="ref15m")
    ap.add_argument("--batch", type=int, default=None, help="default: 8")
    ap.add_argument("--size", type=int, default=None, help="latent size (default: 32 ref15m, 64 released)")
    ap.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                    help="compute dtype (parameters stay float32)")
    ap.add_argument("--linear-attn", action="store_true", help="linear attention at attention_resolutions")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--no-forward", action="store_true", help="skip timing the forward pass")
    ap.add_argument("--sample-solver", choices=ode.SOLVERS, default="euler",
                    help="solver of the timed sample call (the ODE from t=0 to 1)")
    ap.add_argument("--sample-steps", type=int, default=10, help="steps of a fixed-step sample call")
    ap.add_argument("--torch-baseline", action="store_true", help="also time the PyTorch oracle (float32)")
    ap.add_argument("--torch-threads", type=int, default=os.cpu_count())
    ap.add_argument("--reference-ms", type=float, default=768.0,
                    help="reference training-step time to compare against "
                         "(default: PyTorch, ref15m, 2 CPU cores)")
    ap.add_argument("--devices", type=numbers(int), default=(),
                    help="comma-separated device counts, e.g. 1,8: time the data-parallel training "
                         "step of the same global batch on each (fake CPU devices on a CPU host), "
                         "one process per count, and print the ratios")
    ap.add_argument("--mesh-devices", type=int, default=0, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.devices:
        return compare_device_counts(args)

    cfg, default_batch, default_size = CONFIGS[args.config]
    cfg = dict(base_config().unet.to_dict(), **cfg, use_linear_attn=args.linear_attn)
    batch_size, size = args.batch or default_batch, args.size or default_size
    dtype = jnp.dtype(args.dtype)
    device = jax.devices()[0]
    accelerator = device.platform != "cpu"

    print(describe())

    model = EfficientUNet(**cfg, dtype=dtype)
    rng_init, rng_data = jax.random.split(jax.random.PRNGKey(0))
    batch = make_batch(rng_data, batch_size, size, jnp.float32)
    params = jax.jit(model.init)(rng_init, batch["x_t"], batch["t"], batch["context"])
    tx = optax.adam(args.lr)
    state = (params, tx.init(params))
    print(f"config: {args.config} {cfg} params={count_params(params):,} batch={batch_size} "
          f"size={size}x{size} dtype={args.dtype}")

    step_fn = jax.jit(make_unet_step(model, tx), donate_argnums=0)
    if args.mesh_devices:  # data parallel: replicated state, batch split over the devices
        mesh = sharding.make_mesh((("data", -1), ("fsdp", 1)), jax.devices()[:args.mesh_devices])
        rep, split = sharding.replicated(mesh), sharding.batch_sharding(mesh)
        state, batch = jax.device_put(state, rep), jax.device_put(batch, split)
        step_fn = jax.jit(make_unet_step(model, tx), in_shardings=(rep, split),
                          out_shardings=(rep, rep), donate_argnums=0)
    t0 = time.perf_counter()
    train_step = step_fn.lower(state, batch).compile()
    compile_s = time.perf_counter() - t0
    train_flops = flops_of(train_step)

    def run_train():
        nonlocal state
        state, loss = train_step(state, batch)
        loss.block_until_ready()

    train = time_calls(run_train, args.steps, args.warmup)
    peak = peak_tflops(device.device_kind, args.dtype)
    print(f"compile (train step): {compile_s:.1f} s")
    print(summary("train", train, batch_size, train_flops, peak, accelerator))

    if args.mesh_devices:
        print("RESULT " + json.dumps({"devices": args.mesh_devices,
                                      "median_ms": statistics.median(train)}))
        return

    if not args.no_forward:
        forward = jax.jit(model.apply).lower(state[0], batch["x_t"], batch["t"], batch["context"]).compile()
        call = lambda: forward(state[0], batch["x_t"], batch["t"], batch["context"])
        fwd = time_calls(lambda: call().block_until_ready(), args.steps, args.warmup)
        print(summary("forward", fwd, batch_size, flops_of(forward), peak, accelerator))
    sample = make_ode_sample(model, args.sample_solver, args.sample_steps)
    sampler = jax.jit(sample).lower(state[0], batch["x_t"], batch["context"]).compile()
    res = sampler(state[0], batch["x_t"], batch["context"])
    nfe = int(res.stats["nfe"])
    samp = time_calls(lambda: sampler(state[0], batch["x_t"], batch["context"]).x1.block_until_ready(),
                      max(2, args.steps // 3), 1)
    # XLA's cost analysis counts a loop body once; the sample costs NFE forward passes.
    fwd_flops = None if args.no_forward else flops_of(forward)
    print(summary(f"sample ({args.sample_solver}, {nfe} NFE)", samp, batch_size,
                  fwd_flops and nfe * fwd_flops, peak, accelerator))
    kind = "max RSS" if not accelerator else "peak_bytes_in_use"
    print(f"peak memory: {peak_memory_mb(device):.0f} MiB ({kind})")

    train_med = statistics.median(train)
    note = "" if (args.config, batch_size, size, args.dtype) == ("ref15m", 8, 32, "float32") else \
        " [the default reference is for ref15m, batch 8, 32x32, float32]"
    print(ratio_text(train_med, args.reference_ms, f"reference {args.reference_ms:g} ms (train step)") + note)
    if args.torch_baseline:
        res = torch_times(cfg, jax.device_get(batch), args.steps, args.torch_threads)
        if res is not None:
            t_train, t_fwd = res
            print(summary("torch train", t_train, batch_size, None, None, False))
            print(summary("torch fwd", t_fwd, batch_size, None, None, False))
            print(ratio_text(train_med, statistics.median(t_train), "PyTorch in this run (train step)"))
            if not args.no_forward:
                print(ratio_text(statistics.median(fwd), statistics.median(t_fwd),
                                 "PyTorch in this run (forward)"))
            sd = torch_state_dict_from_jax(state[0], model, (1, size, size, cfg["in_channels"]))
            tsample = torch_sample_call(cfg, sd, jax.device_get(batch["x_t"]),
                                        jax.device_get(batch["context"]), args.sample_solver,
                                        args.sample_steps, args.torch_threads)
            if isinstance(tsample, str):
                print(tsample)
            else:
                tcall, tnfe = tsample
                x1_torch = tcall().numpy()
                t_samp = time_calls(tcall, max(2, args.steps // 3), 1)
                x0 = np.asarray(jax.device_get(batch["x_t"]))
                x1 = np.asarray(jax.device_get(sampler(state[0], batch["x_t"], batch["context"]).x1))
                diff = float(np.max(np.abs(np.moveaxis(x1_torch, 1, -1) - x1)))
                moved = float(np.max(np.abs(x1 - x0)))
                same = "equal" if tnfe[0] == nfe else "NOT equal"
                print(summary(f"torch sample (torchdiffeq {TORCHDIFFEQ_METHODS[args.sample_solver]}, "
                              f"{tnfe[0]} NFE)", t_samp, batch_size, None, None, False))
                print(f"sample NFE: fmboost_jax {nfe}, torchdiffeq {tnfe[0]} ({same}); "
                      f"max |x1 jax - x1 torch| = {diff:.2e}, max |x1 - x0| = {moved:.2e} "
                      "(same weights and inputs)")
                j_med, t_med = statistics.median(samp), statistics.median(t_samp)
                how = "adaptive" if args.sample_solver == "dopri5" else f"{args.sample_steps} steps"
                print(f"sample call per image: fmboost_jax {j_med / batch_size:.1f} ms, "
                      f"PyTorch (torchdiffeq) {t_med / batch_size:.1f} ms "
                      f"(batch {batch_size}, {args.sample_solver}, {how})")
                print(f"sample call: fmboost_jax / PyTorch (torchdiffeq) = {j_med / t_med:.2f}")
            last = f"train step: fmboost_jax / PyTorch = {train_med / statistics.median(t_train):.2f}"
            if not args.no_forward:
                last += f", forward: {statistics.median(fwd) / statistics.median(t_fwd):.2f}"
            print(last)


if __name__ == "__main__":
    main()
