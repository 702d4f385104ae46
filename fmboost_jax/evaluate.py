"""Command line: judge a trained upsampler as the paper does (FID, p-FID, KID, PSNR, SSIM, MSE).

    python -m fmboost_jax.evaluate --model runs/lhq --output lhq.json
    python -m fmboost_jax.evaluate --model runs/faceshq --compare_model regression=runs/faceshq_regression
    python -m fmboost_jax.evaluate --model runs/lhq --images ~/held_out --num_images 1000
    python -m fmboost_jax.evaluate --model runs/lhq --data configs/faceshq.py --metrics fid,pfid
    python -m fmboost_jax.evaluate --model params/ --config lhq --data.eval_split=validation \\
        --solver dopri5 --sampling.rtol=1e-4

The ground truth is the held-out set of a config's `data` block (default: the model's own; `--data
SPEC` takes another config's, `--images DIR` every image of a folder, `--data.FIELD=VALUE` sets
any `config.data` field), center-cropped to `--image_size` (default: the model's high-res size).
Each image is down-sampled as in training, boosted, and the boost, the `--compare_model` models' boosts
(e.g. the regression baseline, each with its own config's sampler) and the `--baselines` (the
same low-res input resized) are scored against it. Images stream through in batches; only running
statistics (and KID's features) are kept. FID, p-FID and KID need the converted Inception weights
(`--inception`, default $FMBOOST_INCEPTION or ~/fmboost/inception); without them they are skipped
with one line saying how to get them. Every figure, the sampler settings and what was scored go
to `--output` (JSON, written atomically); a table goes to stdout.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from typing import Any

import ml_collections

from fmboost_jax import cli, compile_cache, paths
from fmboost_jax import config as config_lib
from fmboost_jax.errors import UserError, parse_names
from fmboost_jax.evaluation import benchmark as bm

OVERRIDE_BLOCKS = ("data", "sampling")       # --data.FIELD=VALUE, --sampling.FIELD=VALUE


def build_parser() -> argparse.ArgumentParser:
    p = cli.parser("fmboost_jax.evaluate", __doc__)
    cli.add_model_arguments(p)
    p.add_argument("--data", default=None,
                   help="config (file.py[:arg] or name) whose `data` block names the dataset "
                        "(default: the model's); --data.FIELD=VALUE sets one field")
    p.add_argument("--images", default=None, help="evaluate on every image of this folder")
    p.add_argument("--num_images", type=cli.at_least(1), default=None,
                   help="images to score (default: the data block's num_eval_images)")
    p.add_argument("--image_size", type=cli.at_least(1), default=None,
                   help="center crop of the ground truth in px (default: the model's high-res size)")
    p.add_argument("--batch_size", type=cli.at_least(1), default=8, help="images per boost call")
    p.add_argument("--metrics", default=",".join(bm.METRICS),
                   help=f"comma-separated, of {', '.join(bm.METRICS)} (default: all)")
    p.add_argument("--baselines", default=None,
                   help=f"resize baselines, of {', '.join(bm.BASELINES)}; '' for none "
                        "(default: the config's eval.baselines, bilinear,bicubic)")
    p.add_argument("--inception", default=None,
                   help=f"converted Inception weights (default: ${bm.INCEPTION_VARIABLE} or "
                        f"{bm.INCEPTION_DIR})")
    p.add_argument("--inception_batch", type=cli.at_least(1), default=None,
                   help=f"299² inputs per Inception call (default {bm.INCEPTION_BATCH})")
    p.add_argument("--num_crops", type=cli.at_least(1), default=None,
                   help="p-FID crops per image (default: the config's eval.num_crops, 4)")
    p.add_argument("--crop_size", type=cli.at_least(1), default=None,
                   help="p-FID crop size in px (default: the config's eval.crop_size, 512, "
                        "capped at the image size)")
    p.add_argument("--compare_model", default=[], action="append", metavar="NAME=WORKDIR",
                   help="another trained model scored on the same low-res inputs with its own "
                        "config's sampler, e.g. regression=runs/demo_regression (repeatable)")
    cli.add_sampler_arguments(p)
    p.add_argument("--output", default="results.json", help="JSON file of the results")
    cli.add_compile_cache_argument(p)
    return p


# ------------------------------------------------------------------------ what is scored
def model_config(args: argparse.Namespace) -> ml_collections.ConfigDict:
    """The model's config (its workdir's config.json, or --config); FileNotFoundError naming
    --model when it does not exist."""
    from fmboost_jax.inference.upsampler import read_run_config
    if not paths.isdir(args.model):
        raise FileNotFoundError(f"--model {args.model!r} does not exist")
    if args.config:
        return config_lib.with_defaults(config_lib.load_config(args.config))
    return read_run_config(args.model)


def data_config(config: ml_collections.ConfigDict, args: argparse.Namespace,
                extra: dict[str, str]) -> ml_collections.ConfigDict:
    """`config` with the data block to evaluate on: --data's, --images, --data.FIELD,
    --num_images and --image_size applied in that order; its rules checked."""
    from fmboost_jax.data import pipeline
    c = config.copy_and_resolve_references()
    with c.unlocked():
        if args.data:
            c.data = config_lib.with_defaults(config_lib.load_config(args.data)).data
        if args.images:
            c.data.update(name="folder", path=args.images, eval_path=args.images)
        for field, text in extra.items():
            c.data[field] = cli.typed(c.data, "data", field, text)
        if args.num_images is not None:
            c.data.num_eval_images = args.num_images
        if args.image_size is not None:
            c.data.eval_crop_size = args.image_size
        if c.data.min_size < 0:        # images are skipped below the size they are cropped to
            c.data.min_size = c.data.eval_crop_size or c.high_res_size
    pipeline.check_config(c)
    return c


def eval_images(config: ml_collections.ConfigDict, args: argparse.Namespace):
    """The held-out images (`EvalImages`), checked to be there; the folder of --images named."""
    from fmboost_jax.data import pipeline
    try:
        images = pipeline.EvalImages(config)
    except FileNotFoundError as err:
        if not args.images:
            raise
        raise FileNotFoundError(f"--images: {str(err).removeprefix('config.data.path: ')}") \
            from None
    if not len(images):
        raise FileNotFoundError(f"no images to evaluate in {images.description}")
    return images


def compare_specs(args: argparse.Namespace) -> dict[str, str]:
    """`--compare_model NAME=WORKDIR` as {name: workdir}; UserError for a bad spec or a taken
    name."""
    out: dict[str, str] = {}
    for spec in args.compare_model:
        name, sep, path = spec.partition("=")
        if not sep or not name or not path:
            raise UserError(f"--compare_model {spec!r}: give NAME=WORKDIR, e.g. "
                             "regression=runs/demo_regression")
        if name in ("cfm", *bm.BASELINES) or name in out:
            raise UserError(f"--compare_model {spec!r}: the name {name!r} is taken; choose another")
        out[name] = path
    return out


def fid_setup(args: argparse.Namespace, metrics: tuple[str, ...], config: Any, size: int,
              num_images: int) -> tuple[dict[str, Any], dict[str, str]]:
    """(Benchmark keyword arguments of the FID family, {metric: why skipped}); checks the crops
    and the image count, and loads the Inception weights when they are there."""
    from fmboost_jax.models import inception
    asked = tuple(m for m in metrics if m in bm.FID_METRICS)
    if not asked:
        return {}, {}
    num_crops = config.eval.num_crops if args.num_crops is None else args.num_crops
    crop_size = min(config.eval.crop_size, size) if args.crop_size is None else args.crop_size
    if "pfid" in asked:
        bm.check_crop(num_crops, crop_size, size)
    if num_images < 2:
        raise UserError(f"{', '.join(asked)} need at least 2 images, got {num_images}")
    path = args.inception or bm.default_inception()
    if not paths.isdir(path):
        print(bm.missing_inception(path, asked), file=sys.stderr)
        return {}, {m: f"no Inception weights at {path!r}" for m in asked}
    features = bm.InceptionFeatures(inception.load_inception(path), args.inception_batch)
    return dict(features=features, num_crops=num_crops, crop_size=crop_size,
                crop_seed=args.seed, inception=paths.resolve(path)), {}


# ------------------------------------------------------------------------ the run
def run(args: argparse.Namespace, overrides: dict[str, dict[str, str]]) -> dict[str, Any]:
    """Scores the model; returns (and writes to --output) the report."""
    from tqdm.auto import tqdm

    from fmboost_jax.inference.upsampler import load_upsampler

    compare_specs(args)
    metrics = parse_names(args.metrics, bm.METRICS, "--metrics")
    if not metrics:
        raise UserError("--metrics is empty: name at least one of " + ", ".join(bm.METRICS))
    config = data_config(model_config(args), args, overrides["data"])
    baselines = parse_names(config.eval.baselines if args.baselines is None
                               else args.baselines, bm.BASELINES, "--baselines")
    sampler = cli.sampler_options(args, config.sampling, overrides["sampling"])
    size = config.data.eval_crop_size or config.high_res_size
    images = eval_images(config, args)
    fid_options, skipped = fid_setup(args, metrics, config, size, len(images))
    inception_path = fid_options.pop("inception", None)
    up = load_upsampler(args.model, args.config, vae=args.vae, dtype=args.dtype, step=args.step)
    up.batch_size = args.batch_size             # a last, smaller batch reuses the program
    if size % up.upscale:
        raise UserError(f"image size {size} is not a multiple of the model's {up.upscale}x")
    up.output_size(size // up.upscale, size // up.upscale)     # names a size it cannot take
    options = up.options(**sampler)
    others = compared_models(args, up)
    scored = tuple(m for m in metrics if m not in skipped)
    bench = bm.Benchmark(("cfm", *others, *baselines), scored, **fid_options)
    start = time.perf_counter()
    with tqdm(total=len(images), desc="evaluate", unit="img", dynamic_ncols=True) as bar:
        nfe = bm.run(up, bm.batches(images, args.batch_size), bench, options, args.seed,
                     baselines, bar.update, others)
    report = {
        "model": paths.resolve(args.model), "config": args.config, "step": up.step,
        "data": {"name": config.data.name, "source": images.description},
        "num_images": bench.num_images, "image_size": [size, size],
        "input_size": [size // up.upscale] * 2, "upscale": up.upscale,
        "sampler": options, "seed": args.seed, **nfe,
        "metrics": list(scored), "skipped": skipped, "inception": inception_path,
        "baselines": list(baselines), "results": bench.results(),
        "compared": {name: {"model": paths.resolve(path), "sampler": others[name][1]}
                     for name, path in compare_specs(args).items()},
        "seconds": round(time.perf_counter() - start, 3), "batch_size": args.batch_size,
    }
    if bench.fid is not None:
        report["pfid"] = {"num_crops": fid_options["num_crops"],
                          "crop_size": fid_options["crop_size"], "crop_seed": args.seed}
        report["kid"] = {"subsets": bm.KID_SUBSETS, "subset_size": min(
            bm.KID_SUBSET_SIZE, bench.num_images, bm.KID_MAX_SAMPLES)}
    write_json(report, args.output)
    for line in summary(report):
        print(line)
    print(f"wrote {paths.resolve(args.output)}")
    return report


def compared_models(args: argparse.Namespace, up: Any) -> dict[str, tuple[Any, dict]]:
    """The `--compare_model NAME=WORKDIR` models, each with its own config's sampler options; a bad
    spec, a name taken by a method, or another up-sampling factor is a ValueError."""
    from fmboost_jax.inference.upsampler import load_upsampler
    out: dict[str, tuple[Any, dict]] = {}
    for name, path in compare_specs(args).items():
        other = load_upsampler(path, vae=args.vae, dtype=args.dtype)
        other.batch_size = args.batch_size
        if other.upscale != up.upscale:
            raise UserError(f"--compare_model {name}={path}: that model up-samples {other.upscale}x, "
                             f"--model {up.upscale}x")
        out[name] = (other, other.options())
    return out


def write_json(report: dict[str, Any], path: str) -> None:
    """`report` to `path` atomically (`paths.atomic_write`)."""
    with paths.atomic_write(path) as f:
        f.write((json.dumps(report, indent=2) + "\n").encode())


def summary(report: dict[str, Any]) -> list[str]:
    """One line about what was scored, one per method with its figures."""
    h, w = report["image_size"]
    head = (f"evaluate: {report['num_images']} images at {h}x{w} ({report['upscale']}x), "
            f"{report['sampler'].get('solver', 'one pass')}, NFE {report['nfe']:g}")
    width = max(len(m) for m in report["results"])
    rows = [f"  {m:<{width}}  " + "  ".join(f"{k} {v:.4g}" for k, v in r.items())
            for m, r in report["results"].items()]
    return [head, *rows]


def main(argv: Sequence[str] | None = None) -> int:
    args, overrides = cli.parse_args(build_parser(), argv, OVERRIDE_BLOCKS)
    compile_cache.enable(off=args.no_compile_cache)
    with cli.user_errors_in_one_line():
        if paths.isdir(args.output):
            raise UserError(f"--output {args.output!r} is a folder; give a file name")
        run(args, overrides)
    return 0


def console() -> None:
    """Console script `fmboost-evaluate`."""
    cli.console(main)


if __name__ == "__main__":
    console()
