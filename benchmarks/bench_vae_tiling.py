"""Benchmark tiled against whole-image VAE coding: time and peak memory at 1024² and 2048².

    python benchmarks/bench_vae_tiling.py                       # decode, 1024² and 2048², SD VAE
    python benchmarks/bench_vae_tiling.py --ops encode,decode --sizes 1024,2048,4096 --dtype bfloat16

Every (operation, image size, tiled or whole) case runs in a fresh process, so its peak memory
is its own: the process's maximum resident set on a CPU, XLA's `peak_bytes_in_use` on an
accelerator. Weights are random (the cost does not depend on them). Tiles are `--tile` pixels
with `--overlap` pixels shared by neighbours (the first stage's `tile_size`/`tile_overlap`).
A case that runs out of memory is reported as such. Prints the machine, a table, and for every
size the tiled/whole ratios of time and memory.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

from arguments import names, numbers
from machine import describe

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def run_case(args: argparse.Namespace) -> dict:
    import jax

    from fmboost_jax.config import DTYPES
    from fmboost_jax.first_stage import AutoencoderFirstStage
    from fmboost_jax.first_stage.tiling import TileOptions
    from fmboost_jax.models import autoencoder as ae

    cfg = ae.preset(args.preset)
    tile = args.tile if args.mode == "tiled" else 0
    tiles = TileOptions(tile, args.overlap, bool(args.shared_stats)) if tile else None
    fs = AutoencoderFirstStage(cfg, checkpoint="random", dtype=DTYPES[args.dtype], tiling=tiles)
    params = fs.init_params(jax.random.PRNGKey(0))
    f = cfg.downsample_factor
    if args.op == "decode":
        x = jax.random.normal(jax.random.PRNGKey(1), (1, args.size // f, args.size // f, cfg.z_channels))
        fn = jax.jit(fs.decode)
    else:
        x = jax.random.uniform(jax.random.PRNGKey(1), (1, args.size, args.size, 3), minval=-1, maxval=1)
        fn = jax.jit(fs.encode)
    t0 = time.perf_counter()
    compiled = fn.lower(params, x).compile()
    compile_s = time.perf_counter() - t0
    times = []
    for _ in range(args.repeats + 1):       # the first call warms up (if repeats > 0)
        t0 = time.perf_counter()
        jax.block_until_ready(compiled(params, x))
        times.append(time.perf_counter() - t0)
    times = times[1:] or times
    device = jax.devices()[0]
    if device.platform == "cpu":
        peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    else:
        peak_mb = (device.memory_stats() or {}).get("peak_bytes_in_use", 0) / 2**20
    return {"seconds": min(times), "compile_s": compile_s, "peak_mb": peak_mb,
            "device": f"{device.platform}:{device.device_kind}"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=numbers(int), default="1024,2048",
                    help="image sizes in pixels, comma-separated")
    ap.add_argument("--ops", type=names(("decode", "encode")), default="decode",
                    help="decode and/or encode, comma-separated")
    ap.add_argument("--preset", default="sd", choices=("sd", "sdxl", "sd3", "flux"))
    ap.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    ap.add_argument("--tile", type=int, default=512, help="tile size in pixels")
    ap.add_argument("--overlap", type=int, default=64, help="overlap of neighbouring tiles in pixels")
    ap.add_argument("--shared-stats", type=int, default=1, choices=(0, 1),
                    help="tiles share estimated GroupNorm statistics (1) or use their own (0)")
    ap.add_argument("--repeats", type=int, default=1,
                    help="timed calls after one warm-up call (0: time the first call)")
    ap.add_argument("--timeout", type=int, default=1800, help="seconds per case")
    ap.add_argument("--case", default="", help=argparse.SUPPRESS)  # op:size:mode, in a child
    args = ap.parse_args()
    if args.case:
        args.op, size, args.mode = args.case.split(":")
        args.size = int(size)
        print("RESULT " + json.dumps(run_case(args)), flush=True)
        return

    print(describe(devices=False))   # the cases run in child processes
    print(f"preset={args.preset} dtype={args.dtype} tile={args.tile} overlap={args.overlap} "
          f"shared_stats={args.shared_stats} repeats={args.repeats}")
    results = {}
    argv = [a for a in sys.argv[1:]]
    for op in args.ops:
        for size in args.sizes:
            for mode in ("whole", "tiled"):
                cmd = [sys.executable, __file__, *argv, f"--case={op}:{size}:{mode}"]
                try:
                    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
                    line = [row for row in proc.stdout.splitlines() if row.startswith("RESULT ")]
                    if line:
                        r = json.loads(line[0][len("RESULT "):])
                    else:
                        oom = "RESOURCE_EXHAUSTED" in proc.stderr or proc.returncode in (-9, 137)
                        r = {"error": "out of memory" if oom else proc.stderr.strip()[-300:]}
                except subprocess.TimeoutExpired:
                    r = {"error": f"over {args.timeout} s"}
                results[op, size, mode] = r
                if "error" in r:
                    print(f"{op:6s} {size:5d}² {mode:5s}  failed: {r['error']}", flush=True)
                else:
                    print(f"{op:6s} {size:5d}² {mode:5s}  {r['seconds']:8.2f} s  peak {r['peak_mb']:9.0f} MiB"
                          f"  (compile {r['compile_s']:.1f} s, {r['device']})", flush=True)
    for op in args.ops:
        for size in args.sizes:
            w, t = results[op, size, "whole"], results[op, size, "tiled"]
            if "error" in w or "error" in t:
                continue
            print(f"{op} {size}²: tiled/whole time {t['seconds'] / w['seconds']:.2f}x, "
                  f"peak memory {t['peak_mb'] / w['peak_mb']:.2f}x")


if __name__ == "__main__":
    main()
