"""The demo judged on photos it never saw: CFM, the regression baseline, bilinear and bicubic.

    python -m fmboost_jax.train --config=configs/demo.py --workdir=runs/demo
    python -m fmboost_jax.train --config=configs/demo.py:regression --workdir=runs/demo_regression
    python benchmarks/held_out.py --model runs/demo --regression runs/demo_regression

For each held-out photo (none of them is in `configs/demo.py`'s training photos, and none was
used to choose a setting: `camera`, which chose the demo's evaluation crop size, is left out),
scores PSNR and SSIM at two sizes: `--crops` fixed 32² crops
(the training size) and the whole photo (centre-cropped to the largest size the model makes).
The low-res input is made as in training (`Upsampler.downsample`), and every set is scored as
`python -m fmboost_jax.evaluate` scores it (`evaluation.benchmark.run` into a `Benchmark`: the
predictions clipped to [-1, 1], per-image PSNR and SSIM averaged; the noise from `--seed`).
Prints one Markdown row per photo and size, and the machine.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
from arguments import joined, names
from machine import describe

from fmboost_jax import load_upsampler
from fmboost_jax.data.photos import PHOTOS, eval_crops, load_photo
from fmboost_jax.evaluation import benchmark as bm
from fmboost_jax.inference.upsampler import largest_output

HELD_OUT = ("stereo_motorcycle", "coins", "moon", "clock")
BASELINES = ("bilinear", "bicubic")
METRICS = ("psnr", "ssim")


def whole(up, name: str) -> np.ndarray:
    """The photo centre-cropped to the largest output the model makes, (1, H, W, 3)."""
    img = load_photo(name)
    h, w = largest_output(up, *img.shape[:2])
    top, left = (img.shape[0] - h) // 2, (img.shape[1] - w) // 2
    return img[None, top:top + h, left:left + w]


def row(models: dict, truth: np.ndarray, seed: int) -> dict[str, tuple[float, float]]:
    """(PSNR, SSIM) of every model (`{"cfm": ..., "regression": ...}`, each with its config's
    sampler) and of bilinear and bicubic on one set of ground truth, scored as `evaluate` does."""
    cfm, *others = models
    bench = bm.Benchmark((*models, *BASELINES), METRICS)
    bm.run(models[cfm], [truth], bench, models[cfm].options(), seed, BASELINES,
           others={name: (models[name], models[name].options()) for name in others})
    return {name: (r["psnr"], r["ssim"]) for name, r in bench.results().items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="runs/demo", help="the CFM workdir")
    ap.add_argument("--regression", default="runs/demo_regression",
                    help="the regression baseline's workdir ('' to leave it out)")
    ap.add_argument("--photos", type=names(PHOTOS), default=joined(HELD_OUT),
                    help="held-out scikit-image photos, comma-separated")
    ap.add_argument("--crops", type=int, default=32, help="32² crops per photo")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    print(describe())
    models = {"cfm": load_upsampler(args.model)}
    if args.regression:
        models["regression"] = load_upsampler(args.regression)
    size = models["cfm"].config.high_res_size
    start = time.perf_counter()
    methods = [*models, *BASELINES]
    print("\n| photo | size | " + " | ".join(f"{n} PSNR / SSIM" for n in methods) + " |")
    print("|---|---|" + "---:|" * len(methods))
    for photo in args.photos:
        for label, truth in ((f"{args.crops} crops {size}²", eval_crops((photo,), size, args.crops)),
                             (None, whole(models["cfm"], photo))):
            label = label or f"whole {truth.shape[1]}x{truth.shape[2]}"
            r = row(models, truth, args.seed)
            best = max(r[n][0] for n in methods)
            cells = [f"{'**' if r[n][0] == best else ''}{r[n][0]:.2f}"
                     f"{'**' if r[n][0] == best else ''} / {r[n][1]:.3f}" for n in methods]
            print(f"| {photo} | {label} | " + " | ".join(cells) + " |", flush=True)
    print(f"\n{time.perf_counter() - start:.0f} s; sampler of each model: its config's "
          f"({models['cfm'].options()['solver']}, {models['cfm'].options()['num_steps']} steps)")


if __name__ == "__main__":
    main()
