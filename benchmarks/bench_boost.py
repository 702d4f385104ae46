"""Time and peak memory of one whole boost (PSU encode, ODE solve, decode) at the released size.

    python benchmarks/bench_boost.py                                  # 1024² and 2048² outputs, 1 Euler NFE
    python benchmarks/bench_boost.py --sizes 1024 --nfe 40 --dtype bfloat16   # the paper's 40 NFE

The released UNet (306M parameters) and the SD VAE with random weights (the cost does not depend
on the values), 2x (512² -> 1024² px, 64² -> 128² latents) or, for 2048², 1024² -> 2048² px with
the VAE in 1024-px tiles (`--tile`). Each size runs in a fresh process, so its peak memory (max
RSS on CPUs, peak bytes in use on accelerators) is its own; the first call includes compilation,
a second (`--calls 2`) is the boost alone. Prints the machine it ran on.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

from arguments import numbers
from machine import describe

ROOT = Path(__file__).resolve().parents[1]


def run_case(args: argparse.Namespace) -> dict:
    sys.path.insert(0, str(ROOT))
    import jax
    import numpy as np

    from fmboost_jax.cfm.model import CFM
    from fmboost_jax.config import base_config
    from fmboost_jax.inference.upsampler import Upsampler

    c = base_config()
    c.low_res_size, c.high_res_size = args.size // 2, args.size
    c.dtype = c.first_stage.dtype = args.dtype
    c.first_stage.checkpoint = "random"
    c.first_stage.tile_size = args.tile if args.size > args.tile > 0 else 0
    cfm = CFM.from_config(c)
    params = jax.jit(cfm.init_params)(jax.random.PRNGKey(0))
    up = Upsampler(cfm, params, cfm.first_stage.init_params(jax.random.PRNGKey(1)), c)
    lowres = np.random.default_rng(0).uniform(-1, 1, (1, args.size // 2, args.size // 2, 3))
    times = []
    for _ in range(args.calls):
        start = time.perf_counter()
        out = up(lowres, solver=args.solver, num_steps=args.nfe)
        jax.block_until_ready(out.images)
        times.append(time.perf_counter() - start)
    device = jax.devices()[0]
    if device.platform == "cpu":
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    else:
        peak = device.memory_stats().get("peak_bytes_in_use", 0) / 2**20
    return {"size": args.size, "tile": c.first_stage.tile_size, "nfe": int(out.stats["nfe"]),
            "first_call_s": times[0], "boost_s": times[-1] if len(times) > 1 else None,
            "peak_mib": peak,
            "device": device.device_kind}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=numbers(int), default="1024,2048",
                    help="output sizes in pixels, comma-separated")
    ap.add_argument("--nfe", type=int, default=1, help="Euler steps (the paper: 40)")
    ap.add_argument("--solver", default="euler")
    ap.add_argument("--tile", type=int, default=1024, help="VAE tile size above which to tile")
    ap.add_argument("--dtype", choices=("float32", "bfloat16", "auto"), default="float32")
    ap.add_argument("--calls", type=int, default=1,
                    help="calls per size; the first includes compilation (default 1)")
    ap.add_argument("--size", type=int, default=0, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.size:
        print("RESULT " + json.dumps(run_case(args)))
        return
    print(describe(devices=False))   # the cases run in child processes
    for size in args.sizes:
        cmd = [sys.executable, __file__, f"--size={size}", f"--nfe={args.nfe}",
               f"--solver={args.solver}", f"--tile={args.tile}", f"--dtype={args.dtype}",
               f"--calls={args.calls}"]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        rows = [r for r in proc.stdout.splitlines() if r.startswith("RESULT ")]
        if proc.returncode or not rows:
            print(f"{size}²: failed\n{proc.stderr[-2000:]}")
            continue
        r = json.loads(rows[0][len("RESULT "):])
        print(f"{size}² output ({r['device']}, {r['nfe']} NFE, VAE tile {r['tile'] or 'none'}): "
              f"first call (with compilation) {r['first_call_s']:.1f} s"
              + (f", boost {r['boost_s']:.1f} s" if r["boost_s"] else "")
              + f", peak {r['peak_mib']:.0f} MiB")


if __name__ == "__main__":
    main()
