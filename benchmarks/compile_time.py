"""Compile time of the training step and the sampler, cold and from the persistent cache.

    python benchmarks/compile_time.py                         # configs/demo.py and the released config
    python benchmarks/compile_time.py --configs demo          # quick (CPU: about a minute)
    python benchmarks/compile_time.py --configs demo lhq:smoke,regression   # any config specs
    python benchmarks/compile_time.py --configs demo --smoke --functions train   # a narrow UNet

For each config and function, a fresh process times its first call, as a command line's first
step is: trace (`jit(...).lower`), compile (`.compile()`, or the read from the cache), and the run
of the compiled program; first with a new, empty cache directory (cold), then in another process
with the directory the first one filled (cached). The processes use the command lines' cache set-up
(`fmboost_jax.compile_cache.enable()`, `$FMBOOST_COMPILE_CACHE` pointing at the directory).

Functions: `train` is the trainer's update step (`train.step.make_train_step`: the loss with the
first stage's encode, Adam, EMA; the state donated) at `--batch`; `sample` the sampler of the
config's `sampling` block (`cfm.sampling.make_sample_fn`; fixed-step Euler in the shipped
configs) on `--batch` low-res images; `sample_dopri5` the same with the adaptive dopri5. JAX does
not write programs with host callbacks to the cache: the fixed-step samplers (`cfm.ode`'s own
`lax.scan`) hold none, but dopri5 runs in diffrax, whose runtime checks are equinox host
callbacks, so `sample_dopri5` compiles anew every time unless `EQX_ON_ERROR=nan` is set before
equinox is imported (a failed check then gives NaNs). `--smoke` narrows the UNet (one level, no
attention). `--configs` takes names and config specs separated by spaces (a spec's own argument
may hold commas); `--functions` is comma-separated.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import machine  # noqa: E402  (benchmarks/ is on sys.path: this file's folder)
from arguments import joined, names  # noqa: E402

CONFIGS = {"demo": "demo", "released": None}     # `load_config` specs; None: base_config()
FUNCTIONS = ("train", "sample", "sample_dopri5")
RESULT = "RESULT "


def load(name: str, smoke: bool) -> Any:
    """The config `name` (`CONFIGS`, or a `load_config` spec); `smoke`: a narrow UNet."""
    from fmboost_jax.config import base_config, load_config
    spec = CONFIGS.get(name, name)
    if spec and ".py" in spec and not os.path.isabs(spec):
        spec = str(ROOT / spec)
    c = base_config() if spec is None else load_config(spec)
    if smoke:
        c.unet.update(model_channels=32, num_res_blocks=1, channel_mult=(1,),
                      attention_resolutions=())
    if c.first_stage.name != "identity":
        c.first_stage.checkpoint = "random"
    return c


def timed(fn: Any) -> tuple[Any, float]:
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def setup_train(c: Any, batch: int) -> tuple[Any, tuple]:
    """The jitted (donating) trainer step and its arguments."""
    import jax
    import jax.numpy as jnp

    from fmboost_jax.cfm.model import CFM
    from fmboost_jax.train.state import create_train_state, make_optimizer
    from fmboost_jax.train.step import make_train_step
    cfm, tx = CFM.from_config(c), make_optimizer(c.optim)
    init = jax.jit(lambda r: create_train_state(cfm.init_params(r), tx, r))
    state = init(jax.random.PRNGKey(0))
    fs_params = jax.jit(cfm.first_stage.init_params)(jax.random.PRNGKey(1))
    images = jax.random.uniform(jax.random.PRNGKey(2), (batch, c.high_res_size, c.high_res_size, 3),
                                jnp.float32, -1, 1)
    step = jax.jit(make_train_step(cfm, tx, c), donate_argnums=(0,))
    return step, (state, fs_params, {"image": images})


def setup_sample(c: Any, batch: int, solver: str | None = None) -> tuple[Any, tuple]:
    """The config's jitted sampler (with `solver` instead of the config's, if given) and its
    arguments."""
    import jax
    import jax.numpy as jnp

    from fmboost_jax.cfm import sampling
    from fmboost_jax.cfm.model import CFM
    cfm = CFM.from_config(c)
    params = jax.jit(cfm.init_params)(jax.random.PRNGKey(0))
    fs_params = jax.jit(cfm.first_stage.init_params)(jax.random.PRNGKey(1))
    lowres = jax.random.uniform(jax.random.PRNGKey(2), (batch, c.low_res_size, c.low_res_size, 3),
                                jnp.float32, -1, 1)
    options = sampling.solver_options(c.sampling)
    fn = sampling.make_sample_fn(cfm, **(options | ({"solver": solver} if solver else {})))
    return fn, (params, fs_params, lowres, jax.random.PRNGKey(3))


def measure(args: argparse.Namespace) -> dict[str, Any]:
    """This process's one measurement: set-up, trace, compile and run seconds."""
    from fmboost_jax import compile_cache
    cache = compile_cache.enable()
    import jax
    c = load(args.config, args.smoke)
    setup = {"train": lambda: setup_train(c, args.batch),
             "sample": lambda: setup_sample(c, args.batch),
             "sample_dopri5": lambda: setup_sample(c, args.batch, "dopri5")}[args.function]
    (fn, fn_args), setup_s = timed(setup)
    lowered, trace_s = timed(lambda: fn.lower(*fn_args))
    compiled, compile_s = timed(lowered.compile)
    _, run_s = timed(lambda: jax.block_until_ready(compiled(*fn_args)))
    entries = len(os.listdir(cache)) if cache and os.path.isdir(cache) else 0
    return dict(config=args.config, function=args.function, cache=cache, setup_s=setup_s,
                trace_s=trace_s, compile_s=compile_s, run_s=run_s,
                first_call_s=trace_s + compile_s + run_s, entries=entries, machine=machine.info())


def spawn(args: argparse.Namespace, config: str, function: str, cache_dir: str) -> dict | None:
    """One measurement in a fresh process with `cache_dir` as the compilation cache."""
    env = {k: v for k, v in os.environ.items() if k != "JAX_COMPILATION_CACHE_DIR"}
    env["FMBOOST_COMPILE_CACHE"] = cache_dir
    cmd = [sys.executable, __file__, f"--measure={function}", f"--config={config}",
           f"--batch={args.batch}"] + (["--smoke"] if args.smoke else [])
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    rows = [r for r in proc.stdout.splitlines() if r.startswith(RESULT)]
    if proc.returncode or not rows:
        print(f"{config} {function}: failed (status {proc.returncode})\n{proc.stderr[-2000:]}")
        return None
    return dict(json.loads(rows[0][len(RESULT):]), process_s=time.perf_counter() - t0)


def row(r: dict, kind: str) -> str:
    return (f"{r['config']:9s} {r['function']:11s} {kind:6s} {r['setup_s']:8.1f} {r['trace_s']:8.1f} "
            f"{r['compile_s']:10.1f} {r['run_s']:7.1f} {r['first_call_s']:11.1f} "
            f"{r['process_s']:10.1f} {r['entries']:8d}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--configs", nargs="+", default=list(CONFIGS),
                    help="space-separated: demo, released, or config specs (configs/lhq.py:smoke, "
                         "lhq:smoke,regression)")
    ap.add_argument("--functions", type=names(FUNCTIONS), default=joined(FUNCTIONS),
                    help=f"comma-separated, some of {joined(FUNCTIONS)}")
    ap.add_argument("--batch", type=int, default=2, help="images per call (compile time barely "
                    "depends on it)")
    ap.add_argument("--smoke", action="store_true", help="a narrow UNet: one level, no attention")
    ap.add_argument("--measure", choices=FUNCTIONS, help=argparse.SUPPRESS)
    ap.add_argument("--config", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.measure:
        args.function = args.measure
        print(RESULT + json.dumps(measure(args)))
        return
    start, results, printed = time.perf_counter(), [], False
    head = (f"{'config':9s} {'function':11s} {'cache':6s} {'setup s':>8s} {'trace s':>8s} "
            f"{'compile s':>10s} {'run s':>7s} {'first call':>11s} {'process s':>10s} "
            f"{'entries':>8s}")
    for config in args.configs:
        for function in args.functions:
            with tempfile.TemporaryDirectory(prefix="fmboost_compile_") as cache_dir:
                pair = [spawn(args, config, function, cache_dir) for _ in range(2)]
            if None in pair:
                continue
            if not printed:
                print(f"{machine.line(pair[0]['machine'])}\n{head}")
                printed = True
            for r, kind in zip(pair, ("cold", "cached")):
                print(row(r, kind), flush=True)
            results.append(pair)
    for cold, cached in results:
        print(f"{cold['config']} {cold['function']}: first call {cold['first_call_s']:.1f} s cold, "
              f"{cached['first_call_s']:.1f} s cached ({cold['first_call_s'] / cached['first_call_s']:.1f}x)")
    print(f"total {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
