"""Command line: boost images with a trained upsampler.

    python -m fmboost_jax.upsample --model runs/demo --input photo.png --output photo_4x.png --compare
    python -m fmboost_jax.upsample --model runs/lhq --input ~/generated --output ~/generated_2x
    python -m fmboost_jax.upsample --model runs/lhq --input sd_latents.npy --output ~/boosted
    python -m fmboost_jax.upsample --model runs/a --model runs/b --input small.png --output big.png

`--model` is a training workdir (or converted params with `--config`); several `--model`s are a
cascade, run back to back in their shared latent space. `--input` is an image file, a folder
(searched recursively; each output keeps the input's relative path, as PNG), or a diffusion
model's low-res latents in a `.npy` or `.safetensors` file ((B, h, w, C) or (B, C, h, w), scaled
as the diffusion model emits them; the images go to `--output` as `NAME_0000.png`, ...).
Unreadable or odd files, and images whose size the model cannot take, are skipped with their path
and counted. Outputs are written under a temporary name and renamed when complete, and a rerun
skips outputs that exist, so an interrupted job resumes; it writes what an uninterrupted run would
have (a batch's noise comes from `--seed` and the index of its first input). The sampler is the
model's config's, with `--solver`, `--num_steps`, ... and `--sampling.FIELD=VALUE` applied.
`--compare` also writes
`NAME_compare.png`: bicubic | CFM, labelled. `--ground_truth` takes the inputs as high-res ground
truth: each is centre-cropped to the largest size the model makes, down-sampled as in training and
boosted; the comparison gets a ground-truth panel, and PSNR and SSIM of CFM and bicubic are printed
per image. Grayscale inputs give grayscale PNGs.
"""

from __future__ import annotations

import argparse
import io
import os
import sys
import time
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from fmboost_jax import cli, compile_cache, paths
from fmboost_jax.config import MAX_PIXELS
from fmboost_jax.data import images as images_lib
from fmboost_jax.data.sources import list_images
from fmboost_jax.errors import UserError
from fmboost_jax.inference import side_by_side


def build_parser() -> argparse.ArgumentParser:
    p = cli.parser("fmboost_jax.upsample", __doc__)
    cli.add_model_arguments(p, cascade=True)
    p.add_argument("--input", required=True,
                   help="an image file, a folder of images, or latents (.npy, .safetensors)")
    p.add_argument("--output", required=True, help="output file (for an image file) or folder")
    cli.add_sampler_arguments(p)
    p.add_argument("--batch_size", type=cli.at_least(1), default=4,
                   help="images (of one size) or latents per call")
    p.add_argument("--compare", action="store_true",
                   help="also write NAME_compare.png: bicubic | CFM (images only)")
    p.add_argument("--max_pixels", type=cli.at_least(1), default=None,
                   help=f"skip images with more pixels, checked before decoding (images only; "
                        f"default {MAX_PIXELS})")
    p.add_argument("--ground_truth", action="store_true",
                   help="inputs are high-res ground truth: down-sample, boost, compare and score "
                        "(images only)")
    cli.add_compile_cache_argument(p)
    return p


def check_arguments(args: argparse.Namespace) -> None:
    """Options that would do nothing for the input at hand are refused, before any work."""
    if args.input.endswith(LATENT_SUFFIXES):
        given = [f"--{k}" for k in ("compare", "ground_truth", "max_pixels")
                 if getattr(args, k) not in (None, False)]
        if given:
            raise UserError(f"{', '.join(given)}: only for image inputs, and --input "
                            f"{args.input!r} holds latents")
    if args.step is not None and len(args.model) > 1:
        raise UserError("--step picks the checkpoint of one --model; a cascade takes each "
                        "model's latest")
    configs = args.config or [None]
    if len(configs) not in (1, len(args.model)):
        raise UserError(f"{len(configs)} --config for {len(args.model)} --model: give one per "
                        "model, or one for all")


def output_path(src: str, root: str | None, output: str) -> str:
    """Where the boosted `src` goes: `output` itself for a file input, else its relative path
    under `output` with a .png extension."""
    if root is None:
        return output
    return paths.join(output, os.path.splitext(relative(src, root))[0] + ".png")


def relative(path: str, root: str) -> str:
    """`path` relative to its folder `root` (local or on a bucket)."""
    prefix = root.rstrip("/") + "/"
    return path[len(prefix):] if path.startswith(prefix) else os.path.relpath(path, root)


def save_png(image: np.ndarray, path: str, gray: bool = False) -> None:
    """Writes a uint8 (H, W, 3) image atomically (`paths.atomic_write`); `gray`: as 8-bit
    grayscale (luma), for grayscale inputs."""
    img = Image.fromarray(image)
    with paths.atomic_write(path) as f:
        (img.convert("L") if gray else img).save(f, format="PNG")


def _batches(files: Sequence[str], batch_size: int, skipped: list[str], max_pixels: int
             ) -> Iterator[tuple[int, list[str], np.ndarray]]:
    """(index in `files` of the first, names, decoded images) of consecutive equal-size files, at
    most `batch_size` each; bad files are skipped. The batches depend on `files` alone, so a
    rerun makes the same ones."""
    first, names, images = 0, [], []
    for i, path in enumerate(files):
        try:
            img = images_lib.to_float(images_lib.decode_rgb(paths.read_bytes(path), path, max_pixels))
        except (OSError, images_lib.BadImage) as err:
            skipped.append(str(err))
            continue
        if images and (img.shape != images[0].shape or len(images) == batch_size):
            yield first, names, np.stack(images)
            names, images = [], []
        if not images:
            first = i
        names.append(path)
        images.append(img)
    if images:
        yield first, names, np.stack(images)


LATENT_SUFFIXES = (".npy", ".safetensors")


def read_latents(path: str, channels: int) -> np.ndarray:
    """Latents (B, h, w, C) float32 from a `.npy` file or the first (or `latents`) tensor of a
    `.safetensors` file; (B, C, h, w) arrays, as PyTorch pipelines give them, are transposed."""
    if path.endswith(".npy"):
        try:
            z = np.load(io.BytesIO(paths.read_bytes(path)), allow_pickle=False)
        except ValueError as err:
            raise UserError(f"--input {path!r} is not a numeric .npy array: {err}") from None
    else:
        try:
            from safetensors.numpy import load
        except ImportError:
            raise UserError("reading .safetensors latents needs `pip install safetensors`") from None
        tensors = load(paths.read_bytes(path))
        z = tensors.get("latents", next(iter(tensors.values()), None))
    z = np.asarray(z, np.float32)
    if z.ndim == 3:
        z = z[None]
    if z.ndim == 4 and z.shape[-1] != channels and z.shape[1] == channels:
        z = z.transpose(0, 2, 3, 1)
    if z.ndim != 4 or z.shape[-1] != channels:
        raise UserError(f"--input {path!r}: latents of shape {z.shape} do not have the "
                         f"{channels} channels of the model's VAE")
    return z


def _inputs(input_path: str, output: str) -> tuple[list[str], str | None]:
    """The input files and their root folder (None for a single file)."""
    src = paths.resolve(input_path)
    if paths.isdir(src):
        return list_images(src), src
    if not paths.isfile(src):
        raise FileNotFoundError(f"--input {input_path!r} does not exist")
    if paths.isdir(output):
        raise FileNotFoundError(f"--output {output!r} is a folder; give a file name for a file input")
    return [src], None


def run(args: argparse.Namespace, overrides: dict[str, dict[str, str]]) -> dict[str, int]:
    """Boosts every input without an output yet; returns counts (written, existing, skipped).
    A batch's noise comes from the seed and the index of its first file, so a rerun that
    completes an interrupted folder writes what an uninterrupted run would have."""
    check_arguments(args)
    if args.input.endswith(LATENT_SUFFIXES):
        return boost_latents(args, overrides)
    files, root = _inputs(args.input, args.output)            # bad inputs: before any work
    max_pixels = args.max_pixels or MAX_PIXELS
    if root is None:
        images_lib.decode_rgb(paths.read_bytes(files[0]), args.input, max_pixels)  # BadImage
    dst = {f: output_path(f, root, args.output) for f in files}
    existing = sum(paths.exists(d) for d in dst.values())
    model = load_model(args)
    sampler = sampler_options(model, args, overrides)
    skipped: list[str] = []
    written, start, scores = 0, time.perf_counter(), side_by_side.Scores()
    bar = tqdm(total=len(files), desc="upsample", unit="img", dynamic_ncols=True)
    for first, names, lowres in _batches(files, args.batch_size, skipped, max_pixels):
        bar.update(len(names))
        missing = [j for j, name in enumerate(names) if not paths.exists(dst[name])]
        if not missing:
            continue
        try:
            truth, lowres = (side_by_side.ground_truth(model, lowres) if args.ground_truth
                              else (None, lowres))
            h, w = model.output_size(lowres.shape[1], lowres.shape[2])
        except UserError as err:
            skipped += [f"{n}: {err}" for n in names]
            if root is None:
                raise UserError(f"--input {args.input!r}: {err}") from None
            continue
        out = _boost(model, lowres, _key(args.seed, first), sampler)
        panels = side_by_side.panels(lowres, (h, w), out.images, truth)
        if truth is not None:
            shown = [relative(n, root) if root else args.input for n in names]
            scores.add(shown, truth, **{k: images_lib.to_float(panels[k])    # as written
                                        for k in ("CFM", "bicubic")})
        _write(panels, [(j, dst[names[j]]) for j in missing], lowres, args.compare)
        written += len(missing)
        bar.set_postfix(img_s=f"{written / (time.perf_counter() - start):.2f}",
                        skipped=len(skipped))
    bar.close()
    for message in skipped:
        print(f"skipped {message}", file=sys.stderr)
    counts = {"written": written, "existing": existing, "skipped": len(skipped)}
    print(f"upsample: {written} written, {existing} already there, {len(skipped)} skipped -> "
          f"{args.output}")
    for line in scores.lines() if scores.rows else ():
        print(line)
    return counts


def _key(seed: int, first: int):
    """The sampler's key of the batch whose first input has index `first`."""
    import jax
    return jax.random.fold_in(jax.random.PRNGKey(seed), first)


def _write(panels: dict[str, np.ndarray], rows: list[tuple[int, str]], lowres: np.ndarray,
           compare: bool) -> None:
    """Row j of the boost to its path (grayscale for grayscale inputs), and the comparison."""
    gray = np.all(lowres.max(-1) == lowres.min(-1), axis=(1, 2))          # per image
    for j, dst in rows:
        save_png(panels["CFM"][j], dst, gray[j])
        if compare:
            save_png(side_by_side.comparison({k: v[j] for k, v in panels.items()}),
                     os.path.splitext(dst)[0] + "_compare.png", gray[j])


def load_model(args: argparse.Namespace):
    """One `Upsampler`, or a `Cascade` of one per `--model`."""
    from fmboost_jax.inference.upsampler import Cascade, load_upsampler
    configs = args.config or [None]
    stages = [load_upsampler(m, configs[i % len(configs)], vae=args.vae, dtype=args.dtype,
                             step=args.step) for i, m in enumerate(args.model)]
    for stage in stages:
        stage.batch_size = args.batch_size      # a last, smaller batch reuses the program
    return stages[0] if len(stages) == 1 else Cascade(stages)


def sampler_options(model: Any, args: argparse.Namespace,
                    overrides: dict[str, dict[str, str]]) -> dict[str, Any]:
    """The sampler options of the command line, checked against every stage before any work."""
    stages = getattr(model, "stages", [model])
    options = cli.sampler_options(args, stages[0].config.sampling, overrides["sampling"])
    for stage in stages:
        stage.options(**options)
    return options


def _boost(model: Any, x: np.ndarray, rng: Any, sampler: dict[str, Any], latents: bool = False):
    """The last stage's `SampleOutput` for low-res images (or latents) `x`."""
    from fmboost_jax.inference.upsampler import Cascade
    fn = model.from_latents if latents else model
    if isinstance(model, Cascade):
        return fn(x, rng, decode_all=False, **sampler)[-1]
    return fn(x, rng, **sampler)


def boost_latents(args: argparse.Namespace, overrides: dict[str, dict[str, str]]
                  ) -> dict[str, int]:
    """Latents of a `.npy`/`.safetensors` file -> `--output/NAME_0000.png`, ... (existing ones
    kept; a batch's noise comes from the index of its first row, as for images)."""
    src = paths.resolve(args.input)
    if not paths.isfile(src):
        raise FileNotFoundError(f"--input {args.input!r} does not exist")
    model = load_model(args)
    sampler = sampler_options(model, args, overrides)
    first = model.stages[0] if hasattr(model, "stages") else model
    z = read_latents(src, first.cfm.first_stage.latent_channels)
    stem = os.path.splitext(os.path.basename(src))[0]
    dst = [paths.join(args.output, f"{stem}_{i:04d}.png") for i in range(len(z))]
    existing = sum(paths.exists(d) for d in dst)
    written = 0
    for lo in tqdm(range(0, len(z), args.batch_size), desc="upsample", unit="batch"):
        rows = range(lo, min(lo + args.batch_size, len(z)))
        missing = [i for i in rows if not paths.exists(dst[i])]
        if not missing:
            continue
        out = _boost(model, z[rows.start:rows.stop], _key(args.seed, lo), sampler, latents=True)
        images = images_lib.to_uint8(np.asarray(out.images).clip(-1, 1))
        for i in missing:
            save_png(images[i - lo], dst[i])
        written += len(missing)
    counts = {"written": written, "existing": existing, "skipped": 0}
    print(f"upsample: {written} written, {existing} already there, 0 skipped -> {args.output}")
    return counts


def main(argv: Sequence[str] | None = None) -> int:
    args, overrides = cli.parse_args(build_parser(), argv)
    compile_cache.enable(off=args.no_compile_cache)
    with cli.user_errors_in_one_line():     # BadImage and memory.TooLarge are UserErrors
        run(args, overrides)
    return 0


def console() -> None:
    """Console script `fmboost-upsample`."""
    cli.console(main)


if __name__ == "__main__":
    console()
