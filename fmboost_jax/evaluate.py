"""Command line: judge a trained upsampler as the paper does (FID, p-FID, KID, PSNR, SSIM, MSE).

    python -m fmboost_jax.evaluate --model runs/lhq --output lhq.json
    python -m fmboost_jax.evaluate --model runs/faceshq --compare regression=runs/faceshq_regression
    python -m fmboost_jax.evaluate --model runs/lhq --images ~/held_out --num_images 1000
    python -m fmboost_jax.evaluate --model runs/lhq --data configs/faceshq.py --metrics fid,pfid
    python -m fmboost_jax.evaluate --model params/ --config lhq --data.eval_split=validation \\
        --solver dopri5 --sampling.rtol=1e-4

The ground truth is the held-out set of a config's `data` block (default: the model's own; `--data
SPEC` takes another config's, `--images DIR` every image of a folder, `--data.FIELD=VALUE` sets
any `config.data` field), center-cropped to `--image_size` (default: the model's high-res size).
Each image is down-sampled as in training, boosted, and the boost, the `--compare` models' boosts
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
import os
import sys
import time
from collections.abc import Sequence
from typing import Any

import ml_collections

from fmboost_jax import compile_cache, paths
from fmboost_jax import config as config_lib
from fmboost_jax.cli import user_errors_in_one_line
from fmboost_jax.errors import UserError
from fmboost_jax.evaluation import benchmark as bm

OVERRIDE_BLOCKS = ("data", "sampling")       # --data.FIELD=VALUE, --sampling.FIELD=VALUE


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m fmboost_jax.evaluate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                allow_abbrev=False)
    p.add_argument("--model", required=True, help="training workdir, or converted params (+ --config)")
    p.add_argument("--config", default=None, help="config of converted params (file.py[:arg] or name)")
    p.add_argument("--step", type=int, default=None, help="checkpoint step (default: the latest)")
    p.add_argument("--vae", default=None, help="converted VAE directory (default: the config's)")
    p.add_argument("--dtype", choices=config_lib.DTYPE_NAMES, default=None,
                   help="compute dtype (default: the model's config)")
    p.add_argument("--data", default=None,
                   help="config (file.py[:arg] or name) whose `data` block names the dataset "
                        "(default: the model's); --data.FIELD=VALUE sets one field")
    p.add_argument("--images", default=None, help="evaluate on every image of this folder")
    p.add_argument("--num_images", type=int, default=None,
                   help="images to score (default: the data block's num_eval_images)")
    p.add_argument("--image_size", type=int, default=None,
                   help="center crop of the ground truth in px (default: the model's high-res size)")
    p.add_argument("--batch_size", type=int, default=8, help="images per boost call")
    p.add_argument("--metrics", default=",".join(bm.METRICS),
                   help=f"comma-separated, of {', '.join(bm.METRICS)} (default: all)")
    p.add_argument("--baselines", default=None,
                   help=f"resize baselines, of {', '.join(bm.BASELINES)}; '' for none "
                        "(default: the config's eval.baselines, bilinear,bicubic)")
    p.add_argument("--inception", default=None,
                   help=f"converted Inception weights (default: ${bm.INCEPTION_VARIABLE} or "
                        f"{bm.INCEPTION_DIR})")
    p.add_argument("--inception_batch", type=int, default=None,
                   help=f"299² inputs per Inception call (default {bm.INCEPTION_BATCH})")
    p.add_argument("--num_crops", type=int, default=None,
                   help="p-FID crops per image (default: the config's eval.num_crops, 4)")
    p.add_argument("--crop_size", type=int, default=None,
                   help="p-FID crop size in px (default: the config's eval.crop_size, 512, "
                        "capped at the image size)")
    p.add_argument("--compare", default=[], action="append", metavar="NAME=WORKDIR",
                   help="another trained model scored on the same low-res inputs with its own "
                        "config's sampler, e.g. regression=runs/demo_regression (repeatable)")
    p.add_argument("--solver", default=None, help="sampler (default: the model's config)")
    p.add_argument("--num_steps", type=int, default=None, help="steps of a fixed-step solver")
    p.add_argument("--num_points", type=int, default=None, help="time points (the reference's)")
    p.add_argument("--guidance_scale", type=float, default=None, help="classifier-free guidance w")
    p.add_argument("--seed", type=int, default=0, help="seed of the coupling's noise and the crops")
    p.add_argument("--output", default="results.json", help="JSON file of the results")
    p.add_argument("--no_compile_cache", action="store_true", help=compile_cache.FLAG_HELP)
    return p


# ------------------------------------------------------------------------ overrides
def parse_overrides(rest: Sequence[str]) -> dict[str, dict[str, str]]:
    """The `--data.FIELD=VALUE` / `--sampling.FIELD VALUE` arguments argparse left over ->
    {"data": {FIELD: VALUE}, "sampling": {...}}; ValueError for anything else."""
    out: dict[str, dict[str, str]] = {b: {} for b in OVERRIDE_BLOCKS}
    args = list(rest)
    while args:
        arg = args.pop(0)
        block, dot, field = arg.removeprefix("--").partition(".")
        if not arg.startswith("--") or not dot or block not in out:
            raise UserError(f"unrecognized argument {arg!r} (see --help)")
        field, eq, value = field.partition("=")
        if not eq:
            if not args:
                raise UserError(f"{arg} needs a value")
            value = args.pop(0)
        out[block][field] = value
    return out


def typed(block: ml_collections.ConfigDict, name: str, field: str, text: str) -> Any:
    """`text` as the type of `block[field]` (bool, int, float, comma-separated tuple, str);
    ValueError naming `--name.field` when the field does not exist or the value does not parse."""
    if field not in block:
        raise UserError(f"--{name}.{field}: config.{name} has no field {field!r} (fields: "
                         f"{', '.join(sorted(block))})")
    current = block[field]
    try:
        if isinstance(current, bool):
            if text.lower() not in ("1", "0", "true", "false", "yes", "no"):
                raise UserError(text)
            return text.lower() in ("1", "true", "yes")
        if isinstance(current, (int, float)):
            return type(current)(text)
    except ValueError:
        kind = {bool: "a boolean", int: "an integer", float: "a number"}[type(current)]
        raise UserError(f"--{name}.{field}={text!r} is not {kind}") from None
    if isinstance(current, (tuple, list)):
        return tuple(x.strip() for x in text.split(",") if x.strip())
    return text


def sampler_overrides(args: argparse.Namespace, config: ml_collections.ConfigDict,
                      extra: dict[str, str]) -> dict[str, Any]:
    """The sampler options given on the command line (named flags and --sampling.FIELD)."""
    named = {k: getattr(args, k) for k in ("solver", "num_steps", "num_points", "guidance_scale")}
    return {**{k: v for k, v in named.items() if v is not None},
            **{k: typed(config.sampling, "sampling", k, v) for k, v in extra.items()}}


# ------------------------------------------------------------------------ what is scored
def model_config(args: argparse.Namespace) -> ml_collections.ConfigDict:
    """The model's config (its workdir's config.json, or --config); FileNotFoundError naming
    --model when it does not exist."""
    from fmboost_jax.inference.upsampler import read_run_config
    if not os.path.isdir(paths.resolve(args.model)):
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
            c.data[field] = typed(c.data, "data", field, text)
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


def check_arguments(args: argparse.Namespace) -> None:
    """The counts of the command line, before anything is read."""
    for name in ("batch_size", "inception_batch", "num_images", "image_size", "num_crops"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise UserError(f"--{name} must be >= 1, got {value}")
    compare_specs(args)


def compare_specs(args: argparse.Namespace) -> dict[str, str]:
    """`--compare NAME=WORKDIR` as {name: workdir}; ValueError for a bad spec or a taken name."""
    out: dict[str, str] = {}
    for spec in args.compare:
        name, sep, path = spec.partition("=")
        if not sep or not name or not path:
            raise UserError(f"--compare {spec!r}: give NAME=WORKDIR, e.g. "
                             "regression=runs/demo_regression")
        if name in ("cfm", *bm.BASELINES) or name in out:
            raise UserError(f"--compare {spec!r}: the name {name!r} is taken; choose another")
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
    if not os.path.isdir(paths.resolve(path)):
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

    check_arguments(args)
    metrics = bm.parse_names(args.metrics, bm.METRICS, "--metrics")
    if not metrics:
        raise UserError("--metrics is empty: name at least one of " + ", ".join(bm.METRICS))
    config = data_config(model_config(args), args, overrides["data"])
    baselines = bm.parse_names(config.eval.baselines if args.baselines is None
                               else args.baselines, bm.BASELINES, "--baselines")
    sampler = sampler_overrides(args, config, overrides["sampling"])
    size = config.data.eval_crop_size or config.high_res_size
    images = eval_images(config, args)
    fid_options, skipped = fid_setup(args, metrics, config, size, len(images))
    inception_path = fid_options.pop("inception", None)
    up = load_upsampler(args.model, args.config, vae=args.vae, dtype=args.dtype, step=args.step)
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
    """The `--compare NAME=WORKDIR` models, each with its own config's sampler options; a bad
    spec, a name taken by a method, or another up-sampling factor is a ValueError."""
    from fmboost_jax.inference.upsampler import load_upsampler
    out: dict[str, tuple[Any, dict]] = {}
    for name, path in compare_specs(args).items():
        other = load_upsampler(path, vae=args.vae, dtype=args.dtype)
        if other.upscale != up.upscale:
            raise UserError(f"--compare {name}={path}: that model up-samples {other.upscale}x, "
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
            f"{report['sampler']['solver']}, NFE {report['nfe']:g}")
    width = max(len(m) for m in report["results"])
    rows = [f"  {m:<{width}}  " + "  ".join(f"{k} {v:.4g}" for k, v in r.items())
            for m, r in report["results"].items()]
    return [head, *rows]


def main(argv: Sequence[str] | None = None) -> int:
    args, rest = build_parser().parse_known_args(argv)
    compile_cache.enable(off=args.no_compile_cache)
    with user_errors_in_one_line(ValueError):   # ConfigError, missing files, bad values
        if os.path.isdir(paths.resolve(args.output)):
            raise UserError(f"--output {args.output!r} is a folder; give a file name")
        run(args, parse_overrides(rest))
    return 0


def console() -> None:
    """Console script `fmboost-evaluate`."""
    sys.exit(main())


if __name__ == "__main__":
    console()
