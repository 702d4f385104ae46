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
skips outputs that exist, so an interrupted folder job resumes. `--compare` also writes
`NAME_compare.png`: bicubic | CFM, labelled. `--ground_truth` takes the inputs as high-res ground
truth: each is centre-cropped to the largest size the model makes, down-sampled as in training and
boosted; the comparison gets a ground-truth panel, and PSNR and SSIM of CFM and bicubic are printed
per image. Grayscale inputs give grayscale PNGs.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Iterator, Sequence

import numpy as np
from PIL import Image, ImageDraw

from fmboost_jax import compile_cache, paths
from fmboost_jax.cli import user_errors_in_one_line
from fmboost_jax.data import images as images_lib
from fmboost_jax.data.sources import list_images
from fmboost_jax.errors import UserError


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m fmboost_jax.upsample", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, action="append",
                   help="training workdir, or converted params (+ --config); repeat for a cascade")
    p.add_argument("--config", default=None, action="append",
                   help="config of converted params (file.py[:arg] or name), one per --model")
    p.add_argument("--vae", default=None, help="converted VAE directory (default: the config's)")
    p.add_argument("--input", required=True, help="an image file or a folder of images")
    p.add_argument("--output", required=True, help="output file (for a file input) or folder")
    p.add_argument("--solver", default=None,
                   help="sampler: dopri5, euler, heun, midpoint, rk4, rk4_classic (ODE), "
                        "euler_maruyama, sde_heun (SDE; models with a noised source) "
                        "(default: the model's config)")
    p.add_argument("--num_steps", type=int, default=None, help="steps of a fixed-step solver")
    p.add_argument("--guidance_scale", type=float, default=None,
                   help="classifier-free guidance w (models trained with context dropout)")
    p.add_argument("--seed", type=int, default=0, help="seed of the coupling's noise")
    p.add_argument("--batch_size", type=int, default=4, help="images per call (same-size ones)")
    p.add_argument("--dtype", choices=("auto", "float32", "bfloat16"), default=None,
                   help="compute dtype (default: the model's config)")
    p.add_argument("--compare", action="store_true", help="also write NAME_compare.png")
    p.add_argument("--max_pixels", type=int, default=images_lib.MAX_PIXELS,
                   help="skip images with more pixels (checked before decoding)")
    p.add_argument("--ground_truth", action="store_true",
                   help="inputs are high-res ground truth: down-sample, boost, compare and score")
    p.add_argument("--no_compile_cache", action="store_true", help=compile_cache.FLAG_HELP)
    return p


def output_path(src: str, root: str | None, output: str) -> str:
    """Where the boosted `src` goes: `output` itself for a file input, else its relative path
    under `output` with a .png extension."""
    if root is None:
        return output
    rel = os.path.splitext(os.path.relpath(src, root))[0] + ".png"
    return os.path.join(output, rel)


def save_png(image: np.ndarray, path: str, gray: bool = False) -> None:
    """Writes a uint8 (H, W, 3) image atomically (`paths.atomic_write`); `gray`: as 8-bit
    grayscale (luma), for grayscale inputs."""
    img = Image.fromarray(image)
    with paths.atomic_write(path) as f:
        (img.convert("L") if gray else img).save(f, format="PNG")


def comparison(panels: dict[str, np.ndarray]) -> np.ndarray:
    """Same-size uint8 (H, W, 3) images side by side, each labelled in its top-left corner."""
    row = Image.fromarray(np.concatenate(list(panels.values()), axis=1))
    draw = ImageDraw.Draw(row)
    for i, (label, img) in enumerate(panels.items()):
        x = i * img.shape[1]
        draw.rectangle((x, 0, x + 6 * len(label) + 6, 14), fill=(0, 0, 0))
        draw.text((x + 3, 2), label, fill=(255, 255, 255))
    return np.asarray(row)


def _batches(files: Sequence[str], batch_size: int, skipped: list[str], max_pixels: int
             ) -> Iterator[tuple[list[str], np.ndarray]]:
    """Decoded images in batches of equal size (consecutive files); bad files are skipped."""
    names: list[str] = []
    images: list[np.ndarray] = []
    for path in files:
        try:
            with open(path, "rb") as f:
                img = images_lib.to_float(images_lib.decode_rgb(f.read(), path, max_pixels))
        except (OSError, images_lib.BadImage) as err:
            skipped.append(str(err))
            continue
        if images and (img.shape != images[0].shape or len(images) == batch_size):
            yield names, np.stack(images)
            names, images = [], []
        names.append(path)
        images.append(img)
    if images:
        yield names, np.stack(images)


LATENT_SUFFIXES = (".npy", ".safetensors")


def read_latents(path: str, channels: int) -> np.ndarray:
    """Latents (B, h, w, C) float32 from a `.npy` file or the first (or `latents`) tensor of a
    `.safetensors` file; (B, C, h, w) arrays, as PyTorch pipelines give them, are transposed."""
    if path.endswith(".npy"):
        try:
            z = np.load(path, allow_pickle=False)
        except ValueError as err:
            raise UserError(f"--input {path!r} is not a numeric .npy array: {err}") from None
    else:
        try:
            from safetensors.numpy import load_file
        except ImportError:
            raise UserError("reading .safetensors latents needs `pip install safetensors`") from None
        tensors = load_file(path)
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
    if os.path.isdir(src):
        return list_images(src), src
    if not os.path.isfile(src):
        raise FileNotFoundError(f"--input {input_path!r} does not exist")
    if os.path.isdir(output):
        raise FileNotFoundError(f"--output {output!r} is a folder; give a file name for a file input")
    return [src], None


def run(args: argparse.Namespace) -> dict[str, int]:
    """Boosts every input without an output yet; returns counts (written, existing, skipped)."""
    import jax
    from tqdm.auto import tqdm

    from fmboost_jax.cfm.upsampling import resize

    if args.input.endswith(LATENT_SUFFIXES):
        return boost_latents(args)
    files, root = _inputs(args.input, args.output)            # bad inputs: before any work
    if root is None:
        with open(files[0], "rb") as f:
            images_lib.decode_rgb(f.read(), args.input, args.max_pixels)   # BadImage: one line
    todo = [f for f in files if not os.path.exists(output_path(f, root, args.output))]
    model = load_model(args)
    skipped: list[str] = []
    written, start = 0, time.perf_counter()
    bar = tqdm(total=len(todo), desc="upsample", unit="img", dynamic_ncols=True)
    scores = Scores()
    for i, (names, lowres) in enumerate(_batches(todo, args.batch_size, skipped, args.max_pixels)):
        try:
            truth, lowres = _ground_truth(model, lowres) if args.ground_truth else (None, lowres)
            h, w = model.output_size(lowres.shape[1], lowres.shape[2])
        except ValueError as err:
            skipped += [f"{n}: {err}" for n in names]
            if root is None:
                raise UserError(f"--input {args.input!r}: {err}") from None
            bar.update(len(names))
            continue
        out = _boost(model, lowres, jax.random.fold_in(jax.random.PRNGKey(args.seed), i), args)
        bicubic = resize(lowres, (h, w), "bicubic")
        if truth is not None:
            shown = [os.path.relpath(n, root) if root else args.input for n in names]
            scores.add(shown, truth, CFM=out.images, bicubic=bicubic)
        gray = np.all(lowres.max(-1) == lowres.min(-1), axis=(1, 2))          # per image
        panels = {"bicubic": bicubic, "CFM": out.images, "ground truth": truth}
        panels = {k: images_lib.to_uint8(np.asarray(v).clip(-1, 1))
                  for k, v in panels.items() if v is not None}
        for j, name in enumerate(names):
            dst = output_path(name, root, args.output)
            save_png(panels["CFM"][j], dst, gray[j])
            if args.compare:
                save_png(comparison({k: v[j] for k, v in panels.items()}),
                         os.path.splitext(dst)[0] + "_compare.png", gray[j])
        written += len(names)
        bar.update(len(names))
        bar.set_postfix(img_s=f"{written / (time.perf_counter() - start):.2f}",
                        skipped=len(skipped))
    bar.close()
    for message in skipped:
        print(f"skipped {message}", file=sys.stderr)
    counts = {"written": written, "existing": len(files) - len(todo), "skipped": len(skipped)}
    print(f"upsample: {counts['written']} written, {counts['existing']} already there, "
          f"{counts['skipped']} skipped -> {args.output}")
    for line in scores.lines() if scores.rows else ():
        print(line)
    return counts


def _ground_truth(model, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """High-res images -> (the centre crop of the largest size the model makes, its low-res
    input made as in training); ValueError for images too small for the model."""
    from fmboost_jax.inference.upsampler import largest_output
    h, w = largest_output(model, images.shape[1], images.shape[2])
    if not (h and w):
        raise UserError(f"a {images.shape[1]}x{images.shape[2]} image is too small for the "
                         f"model's smallest output")
    y, x = (images.shape[1] - h) // 2, (images.shape[2] - w) // 2
    truth = images[:, y:y + h, x:x + w]
    return truth, np.asarray(model.downsample(truth))


class Scores:
    """Per-image PSNR and SSIM of several methods against the ground truth."""

    def __init__(self):
        self.rows: dict[str, dict[str, tuple[float, float]]] = {}   # name -> method -> scores

    def add(self, names: Sequence[str], truth: np.ndarray, **methods) -> None:
        from fmboost_jax.evaluation import metrics
        for method, images in methods.items():
            psnr, ssim = np.asarray(metrics.psnr(images, truth)), np.asarray(metrics.ssim(images, truth))
            for name, p, q in zip(names, psnr, ssim):
                self.rows.setdefault(name, {})[method] = (float(p), float(q))

    def lines(self) -> list[str]:
        """One line per image, then the means."""
        line = lambda scores: ", ".join(f"{m} {p:.2f} dB / SSIM {q:.3f}" for m, (p, q) in scores.items())
        means = {m: tuple(np.mean([r[m] for r in self.rows.values()], axis=0))
                 for m in next(iter(self.rows.values()), {})}
        return ([f"{name}: {line(scores)}" for name, scores in self.rows.items()]
                + [f"mean of {len(self.rows)} images against the ground truth: {line(means)}"])


def load_model(args: argparse.Namespace):
    """One `Upsampler`, or a `Cascade` of one per `--model`."""
    from fmboost_jax.inference.upsampler import Cascade, load_upsampler
    configs = args.config or [None]
    if len(configs) not in (1, len(args.model)):
        raise UserError(f"{len(configs)} --config for {len(args.model)} --model: give one per "
                         "model, or one for all")
    stages = [load_upsampler(m, configs[i % len(configs)], vae=args.vae, dtype=args.dtype)
              for i, m in enumerate(args.model)]
    return stages[0] if len(stages) == 1 else Cascade(stages)


def _boost(model, x: np.ndarray, rng, args: argparse.Namespace, latents: bool = False):
    """The last stage's `SampleOutput` for low-res images (or latents) `x`."""
    from fmboost_jax.inference.upsampler import Cascade
    kw = dict(solver=args.solver, num_steps=args.num_steps, guidance_scale=args.guidance_scale)
    fn = model.from_latents if latents else model
    if isinstance(model, Cascade):
        return fn(x, rng, decode_all=False, **kw)[-1]
    return fn(x, rng, **kw)


def boost_latents(args: argparse.Namespace) -> dict[str, int]:
    """Latents of a `.npy`/`.safetensors` file -> `--output/NAME_0000.png`, ... (existing skipped)."""
    import jax
    from tqdm.auto import tqdm

    src = paths.resolve(args.input)
    if not os.path.isfile(src):
        raise FileNotFoundError(f"--input {args.input!r} does not exist")
    model = load_model(args)
    first = model.stages[0] if hasattr(model, "stages") else model
    z = read_latents(src, first.cfm.first_stage.latent_channels)
    stem = os.path.splitext(os.path.basename(src))[0]
    dst = [os.path.join(args.output, f"{stem}_{i:04d}.png") for i in range(len(z))]
    todo = [i for i in range(len(z)) if not os.path.exists(dst[i])]
    written = 0
    for lo in tqdm(range(0, len(todo), args.batch_size), desc="upsample", unit="batch"):
        rows = todo[lo:lo + args.batch_size]
        out = _boost(model, z[rows], jax.random.fold_in(jax.random.PRNGKey(args.seed), lo), args,
                     latents=True)
        for i, img in zip(rows, images_lib.to_uint8(np.asarray(out.images).clip(-1, 1))):
            save_png(img, dst[i])
        written += len(rows)
    counts = {"written": written, "existing": len(z) - len(todo), "skipped": 0}
    print(f"upsample: {written} written, {counts['existing']} already there, 0 skipped -> "
          f"{args.output}")
    return counts


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    compile_cache.enable(off=args.no_compile_cache)
    with user_errors_in_one_line(ValueError):   # BadImage and memory.TooLarge included
        run(args)
    return 0


def console() -> None:
    """Console script `fmboost-upsample`."""
    sys.exit(main())


if __name__ == "__main__":
    console()
