"""Which sampler to pick: quality and time against NFE for every sampler, on held-out photos.

    python -m fmboost_jax.train --config=configs/demo.py:paper --workdir=runs/demo_paper
    python benchmarks/sampler_study.py --model runs/demo_paper --plot docs/sampler_study.png

For a model with the paper's coupling (the source noised at step 400; `demo.py:paper`), boosts
crops of held-out photos (never trained on) with euler, heun, rk4, dopri5 at several tolerances
and the two SDE samplers at several step counts, and prints PSNR, SSIM, NFE and wall time per
image (the compiled call alone; compilation is timed apart), as a Markdown table, with bicubic
as the reference line. The images are scored as `python -m fmboost_jax.evaluate` scores them
(`evaluation.benchmark.Benchmark`: clipped to [-1, 1], per-image PSNR and SSIM averaged).
`--guidance` adds a sweep of the classifier-free guidance scale for a model trained with context
dropout. Saves a plot of PSNR and SSIM against NFE (matplotlib).
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np
from arguments import joined, names, numbers
from machine import describe

from fmboost_jax import load_upsampler
from fmboost_jax.data.photos import PHOTOS, eval_crops
from fmboost_jax.evaluation import benchmark as bm

HELD_OUT = ("stereo_motorcycle", "camera", "coins")
SWEEP = (  # (label, sampler options)
    *[("euler", dict(solver="euler", num_steps=n)) for n in (1, 2, 4, 8, 16, 32)],
    *[("heun", dict(solver="heun", num_steps=n)) for n in (1, 2, 4, 8, 16)],
    *[("rk4", dict(solver="rk4", num_steps=n)) for n in (1, 2, 4, 8)],
    *[("dopri5", dict(solver="dopri5", rtol=r, atol=r * 1e-3)) for r in (1e-1, 1e-2, 1e-3, 1e-4)],
    *[("euler_maruyama", dict(solver="euler_maruyama", num_steps=n)) for n in (2, 4, 8, 16, 32)],
    *[("sde_heun", dict(solver="sde_heun", num_steps=n)) for n in (1, 2, 4, 8, 16)],
)


def quality(truth: jax.Array, images: jax.Array) -> dict[str, float]:
    """{"psnr", "ssim"} of `images` against `truth`, as `evaluate` scores them."""
    bench = bm.Benchmark(("images",), ("psnr", "ssim"))
    bench.update(truth, {"images": images})
    return bench.results()["images"]


def score(up, lowres: jax.Array, truth: jax.Array, options: dict, seed: int) -> dict:
    """Mean PSNR/SSIM, NFE and seconds per image of one sampler setting (compiled call alone)."""
    key = jax.random.PRNGKey(seed)
    start = time.perf_counter()
    jax.block_until_ready(up(lowres, key, **options).images)                 # compiles
    compile_s = time.perf_counter() - start
    start = time.perf_counter()
    out = up(lowres, key, **options)
    images = jax.block_until_ready(out.images)
    seconds = time.perf_counter() - start
    return {**quality(truth, images), "nfe": int(np.max(out.stats["nfe"])),
            "ms_per_image": 1e3 * seconds / len(truth), "compile_s": compile_s}


def plot(rows: list[dict], bicubic: dict, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, metric in zip(axes, ("psnr", "ssim")):
        for label in dict.fromkeys(r["label"] for r in rows):
            pts = sorted((r["nfe"], r[metric]) for r in rows if r["label"] == label)
            ax.plot(*zip(*pts), marker="o", label=label)
        ax.axhline(bicubic[metric], color="gray", linestyle="--", label="bicubic")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("network evaluations (NFE)")
        ax.set_ylabel("PSNR (dB)" if metric == "psnr" else "SSIM")
    axes[0].legend(fontsize=8)
    fig.suptitle("demo.py:paper on held-out crops: quality against NFE")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="runs/demo_paper", help="workdir of a noised-source model")
    ap.add_argument("--photos", type=names(PHOTOS), default=joined(HELD_OUT),
                    help="held-out scikit-image photos, comma-separated")
    ap.add_argument("--crop", type=int, default=32, help="crop size in pixels (ground truth)")
    ap.add_argument("--crops_per_photo", type=int, default=32)
    ap.add_argument("--guidance", type=numbers(float), default="0,1,1.5,2,3",
                    help="guidance scales to sweep with --guidance_solver ('' to skip)")
    ap.add_argument("--guidance_solver", default="euler:8", help="SOLVER:STEPS of the sweep")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--plot", default="", help="write the plot here (PNG)")
    args = ap.parse_args()

    print(describe())
    up = load_upsampler(args.model)
    truth = np.concatenate([eval_crops((p,), args.crop, args.crops_per_photo)
                            for p in args.photos])
    truth = jnp.asarray(truth)
    lowres = up.downsample(truth)
    base = quality(truth, bm.baselines(lowres, truth.shape[1:3], ("bicubic",))["bicubic"])
    print(f"{len(truth)} crops of {args.crop}² from {joined(args.photos)} (held out); model "
          f"{args.model}")
    print("\n| sampler | setting | NFE | PSNR dB | SSIM | ms / image | compile s |")
    print("|---|---|---:|---:|---:|---:|---:|")
    print(f"| bicubic | | 0 | {base['psnr']:.2f} | {base['ssim']:.4f} | | |")
    rows = []
    for label, options in SWEEP:
        r = {"label": label, **score(up, lowres, truth, options, args.seed)}
        rows.append(r)
        setting = ", ".join(f"{k}={v}" for k, v in options.items() if k != "solver")
        print(f"| {label} | {setting} | {r['nfe']} | {r['psnr']:.2f} | {r['ssim']:.4f} | "
              f"{r['ms_per_image']:.2f} | {r['compile_s']:.1f} |", flush=True)
    if args.guidance and up.config.coupling.context_dropout > 0:
        solver, steps = args.guidance_solver.split(":")
        print(f"\nclassifier-free guidance, {solver} {steps} steps "
              f"(context dropout {up.config.coupling.context_dropout} in training)")
        print("\n| w | NFE | PSNR dB | SSIM |\n|---:|---:|---:|---:|")
        for w in args.guidance:
            r = score(up, lowres, truth, dict(solver=solver, num_steps=int(steps),
                                              guidance_scale=w), args.seed)
            print(f"| {w:g} | {r['nfe']} | {r['psnr']:.2f} | {r['ssim']:.4f} |", flush=True)
    if args.plot:
        plot(rows, base, args.plot)
        print(f"\nplot: {args.plot}")


if __name__ == "__main__":
    main()
