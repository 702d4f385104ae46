"""Command line: boost images with a trained upsampler.

    python -m fmboost_jax.upsample --model runs/demo --input photo.png --output photo_4x.png --compare
    python -m fmboost_jax.upsample --model runs/lhq --input ~/generated --output ~/generated_2x

`--model` is a training workdir (or converted params with `--config`). `--input` is an image file
or a folder (searched recursively; each output keeps the input's relative path, as PNG).
Unreadable or odd files, and images whose size the model cannot take, are skipped with their path
and counted. Outputs are written under a temporary name and renamed when complete, and a rerun
skips outputs that exist, so an interrupted folder job resumes. `--compare` also writes
`NAME_compare.png`: bicubic | CFM, labelled.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Iterator, Sequence

import numpy as np
from PIL import Image, ImageDraw

from fmboost_jax import paths
from fmboost_jax.config import user_errors_in_one_line
from fmboost_jax.data import images as images_lib
from fmboost_jax.data.sources import list_images


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m fmboost_jax.upsample", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="training workdir, or converted params (+ --config)")
    p.add_argument("--config", default=None, help="config of converted params (file.py[:arg] or name)")
    p.add_argument("--vae", default=None, help="converted VAE directory (default: the config's)")
    p.add_argument("--input", required=True, help="an image file or a folder of images")
    p.add_argument("--output", required=True, help="output file (for a file input) or folder")
    p.add_argument("--solver", default=None, help="ODE solver (default: the model's config)")
    p.add_argument("--num_steps", type=int, default=None, help="steps of a fixed-step solver")
    p.add_argument("--seed", type=int, default=0, help="seed of the coupling's noise")
    p.add_argument("--batch_size", type=int, default=4, help="images per call (same-size ones)")
    p.add_argument("--dtype", choices=("auto", "float32", "bfloat16"), default=None,
                   help="compute dtype (default: the model's config)")
    p.add_argument("--compare", action="store_true", help="also write NAME_compare.png")
    return p


def output_path(src: str, root: str | None, output: str) -> str:
    """Where the boosted `src` goes: `output` itself for a file input, else its relative path
    under `output` with a .png extension."""
    if root is None:
        return output
    rel = os.path.splitext(os.path.relpath(src, root))[0] + ".png"
    return os.path.join(output, rel)


def save_png(image: np.ndarray, path: str) -> None:
    """Writes a uint8 (H, W, 3) image atomically (a temporary name, then a rename)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}.png"
    Image.fromarray(image).save(tmp, format="PNG")
    os.replace(tmp, path)


def comparison(bicubic: np.ndarray, boosted: np.ndarray) -> np.ndarray:
    """bicubic | CFM side by side (uint8), each labelled in its top-left corner."""
    pair = Image.fromarray(np.concatenate([bicubic, boosted], axis=1))
    draw = ImageDraw.Draw(pair)
    for x, label in ((0, "bicubic"), (bicubic.shape[1], "CFM")):
        draw.rectangle((x, 0, x + 8 * len(label) + 6, 14), fill=(0, 0, 0))
        draw.text((x + 3, 2), label, fill=(255, 255, 255))
    return np.asarray(pair)


def _batches(files: Sequence[str], batch_size: int, skipped: list[str]
             ) -> Iterator[tuple[list[str], np.ndarray]]:
    """Decoded images in batches of equal size (consecutive files); bad files are skipped."""
    names: list[str] = []
    images: list[np.ndarray] = []
    for path in files:
        try:
            with open(path, "rb") as f:
                img = images_lib.to_float(images_lib.decode_rgb(f.read(), path))
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
    from fmboost_jax.inference.upsampler import load_upsampler

    files, root = _inputs(args.input, args.output)
    todo = [f for f in files if not os.path.exists(output_path(f, root, args.output))]
    up = load_upsampler(args.model, args.config, vae=args.vae, dtype=args.dtype)
    skipped: list[str] = []
    written, start = 0, time.perf_counter()
    bar = tqdm(total=len(todo), desc="upsample", unit="img", dynamic_ncols=True)
    for i, (names, lowres) in enumerate(_batches(todo, args.batch_size, skipped)):
        h, w = lowres.shape[1] * up.upscale, lowres.shape[2] * up.upscale
        try:
            up.cfm.latent_size((h, w))
        except ValueError as err:
            skipped += [f"{n}: {err}" for n in names]
            if root is None:
                raise ValueError(f"--input {args.input!r}: {err}") from None
            bar.update(len(names))
            continue
        out = up(lowres, jax.random.fold_in(jax.random.PRNGKey(args.seed), i),
                 solver=args.solver, num_steps=args.num_steps)
        boosted = images_lib.to_uint8(np.asarray(out.images).clip(-1, 1))
        bicubic = images_lib.to_uint8(np.asarray(resize(lowres, (h, w), "bicubic")).clip(-1, 1))
        for name, img, bic in zip(names, boosted, bicubic):
            dst = output_path(name, root, args.output)
            save_png(img, dst)
            if args.compare:
                save_png(comparison(bic, img), os.path.splitext(dst)[0] + "_compare.png")
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
    return counts


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    with user_errors_in_one_line(ValueError):
        run(args)
    return 0


def console() -> None:
    """Console script `fmboost-upsample`."""
    sys.exit(main())


if __name__ == "__main__":
    console()
