"""Command line: a page to boost photos in the browser (Gradio), over the `Upsampler` of `upsample`.

    python -m fmboost_jax.app --model runs/demo              # then open http://127.0.0.1:7860

Drop one or several images (or pick an example photo), choose the solver, steps, seed, guidance
scale (models trained with context dropout) and dtype, press **Boost**: the result is shown
against bicubic on a before/after slider and side by side, with its size, NFE and seconds, and
the full-resolution PNGs are offered for download. "Ground truth" takes the upload as the
high-res truth (centre-cropped, down-sampled as in training, boosted) and shows PSNR and SSIM of
CFM and bicubic. Before a boost starts the page shows what it should take on this machine (the
rate measured by a warm-up boost at start and by every boost since) and refuses boosts over
`--max_seconds`; inputs larger than `--tile` low-res pixels are boosted in overlapping tiles,
one at a time, the progress bar counting them; images over `--max_pixels`, sizes the network
cannot take, boosts that do not fit the device's memory and files that are not images are
refused with one line on the page.
One boost runs at a time (a queue); programs are compiled once per size and options and kept in
JAX's persistent compilation cache. Binds to 127.0.0.1 unless `--host` says otherwise; `--share`
makes a public Gradio link only when asked. Gradio is optional: `pip install "gradio>=6.20,<7"`.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import shutil
import statistics
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from fmboost_jax import cli, compile_cache, paths
from fmboost_jax.cfm import ode, sde
from fmboost_jax.cfm.sampling import SOLVERS
from fmboost_jax.config import MAX_PIXELS
from fmboost_jax.data import images as images_lib
from fmboost_jax.errors import UserError
from fmboost_jax.inference import side_by_side, tiles

GRADIO = "gradio>=6.20,<7"
MAX_SECONDS = 300.0                 # default --max_seconds: keeps a CPU page responsive
DTYPES = ("float32", "bfloat16")
EXAMPLES = ("chelsea", "coffee", "rocket")   # scikit-image photos, shrunk to EXAMPLE_SIDE
EXAMPLE_SIDE = 96
MAX_UPLOAD = "100mb"                # per uploaded file (Gradio's limit; pixels: --max_pixels)
TILE, TILE_OVERLAP = 128, 16        # larger low-res inputs are boosted in tiles of this many px


@dataclasses.dataclass(frozen=True)
class Options:
    """What the page's controls choose for one boost."""
    solver: str
    num_steps: int
    seed: int = 0
    guidance_scale: float = 1.0
    dtype: str = "float32"
    ground_truth: bool = False


@dataclasses.dataclass(frozen=True)
class Boosted:
    """One boosted image: uint8 (H, W, 3) panels, its PNG, and what it cost."""
    name: str
    bicubic: np.ndarray
    cfm: np.ndarray
    truth: np.ndarray | None
    png: str
    nfe: int
    seconds: float
    compile_seconds: float
    scores: str = ""


def evaluations(solver: str, num_steps: int, guided: bool, seen: dict[str, int]) -> int:
    """Expected UNet evaluations of a boost (an adaptive solver: the last count seen, else a
    guess of 10 steps), twice that with guidance."""
    if solver in ode.EVALS_PER_STEP:
        n = ode.EVALS_PER_STEP[solver] * num_steps
    elif solver in sde.EVALS_PER_STEP:
        n = sde.EVALS_PER_STEP[solver] * num_steps + 1
    else:
        n = seen.get(solver, 1 + 6 * 10)
    return n * (2 if guided else 1)


class Rates:
    """Seconds per output pixel and UNet evaluation, measured per dtype and output size; an
    estimate uses the measurement nearest in pixels (a CPU's rate falls at large sizes)."""

    def __init__(self):
        self.runs: dict[tuple[str, int], list[float]] = {}   # (dtype, pixels) -> s / (px * eval)
        self.compiles: list[float] = []

    def add(self, dtype: str, pixels: int, evals: int, seconds: float, compile_s: float) -> None:
        self.runs.setdefault((dtype, pixels), []).append(seconds / (pixels * evals))
        if compile_s:
            self.compiles.append(compile_s)

    def seconds(self, dtype: str, pixels: int, evals: int, compiled: bool) -> float | None:
        """The expected seconds of a boost, with a compile unless `compiled`; None: no rate yet."""
        known = [(abs(math.log(p / pixels)), statistics.median(r))
                 for (d, p), r in self.runs.items() if d == dtype]
        if not known:
            return None
        rate = min(known)[1]
        compile_s = 0.0 if compiled or not self.compiles else statistics.median(self.compiles)
        return rate * pixels * evals + compile_s


class Booster:
    """The page's work, without Gradio: reads the uploads, checks them, estimates the time and
    boosts them with the `Upsampler` that `load(dtype)` returns (loaded once per dtype)."""

    def __init__(self, load: Callable[[str], Any], max_pixels: int = MAX_PIXELS,
                 max_seconds: float = MAX_SECONDS, out_dir: str | None = None,
                 tile: int = TILE, overlap: int = TILE_OVERLAP):
        self._load, self._models = load, {}
        self.max_pixels, self.max_seconds = max_pixels, max_seconds
        self.tile, self.overlap = tile, overlap     # tile 0: every image in one call
        self.out_dir = out_dir or tempfile.mkdtemp(prefix="fmboost_app_")
        self.rates, self.nfe_seen, self.compiled = Rates(), {}, set()
        # The page estimates (outside the queue) while a boost runs: one lock for the models
        # and the measurements.
        self._lock = threading.RLock()

    def model(self, dtype: str) -> Any:
        with self._lock:
            if dtype not in self._models:
                self._models[dtype] = self._load(dtype)
            return self._models[dtype]

    def read(self, files: Sequence[str]) -> list[tuple[str, np.ndarray]]:
        """Uploaded files -> (name, image (h, w, 3) in [-1, 1]); `BadImage` names the file."""
        if not files:
            raise UserError("no image: upload one, or pick an example photo")
        out = []
        for f in files:
            name = os.path.basename(f)
            image = images_lib.decode_rgb(paths.read_bytes(f), name, self.max_pixels)
            out.append((name, images_lib.to_float(image)))
        return out

    def inputs(self, model: Any, images: list[tuple[str, np.ndarray]], ground_truth: bool
               ) -> list[tuple[str, np.ndarray, np.ndarray | None]]:
        """(name, low-res (1, h, w, 3), ground truth (1, H, W, 3) or None), sizes checked."""
        out = []
        for name, image in images:
            try:
                truth, x = (side_by_side.ground_truth(model, image[None]) if ground_truth
                            else (None, image[None]))
                shape, _ = self.calls(x)                 # a tiled input: each tile's size
                model.output_size(shape[1], shape[2])
            except ValueError as err:                # UserError, or a size the UNet cannot take
                raise UserError(f"{name}: {err}") from None
            out.append((name, x, truth))
        return out

    def _key(self, shape: tuple[int, ...], o: Options) -> tuple:
        return (o.dtype, shape, o.solver, o.num_steps, o.guidance_scale)

    def calls(self, x: np.ndarray) -> tuple[tuple[int, ...], int]:
        """The input shape of each call that boosts `x` (1, h, w, 3), and how many calls: one,
        or one per tile when `x` is larger than `tile`."""
        h, w = x.shape[1:3]
        if not self.tile or max(h, w) <= self.tile:
            return x.shape, 1
        return ((1, min(h, self.tile), min(w, self.tile), 3),
                tiles.tile_count(h, w, self.tile, self.overlap))

    def seconds(self, model: Any, items: list, o: Options) -> float | None:
        """The expected seconds of boosting `items` with `o` (None: nothing measured yet)."""
        with self._lock:
            return self._seconds(model, items, o)

    def _seconds(self, model: Any, items: list, o: Options) -> float | None:
        evals = evaluations(o.solver, o.num_steps, o.guidance_scale != 1.0, self.nfe_seen)
        total, keys = 0.0, set(self.compiled)
        for _, x, _ in items:
            shape, n = self.calls(x)
            h, w = model.output_size(shape[1], shape[2])
            first = self.rates.seconds(o.dtype, h * w, evals, self._key(shape, o) in keys)
            rest = self.rates.seconds(o.dtype, h * w, evals, True)
            if first is None:
                return None
            total, keys = total + first + (n - 1) * rest, keys | {self._key(shape, o)}
        return total

    def estimate(self, files: Sequence[str], o: Options) -> float | None:
        model = self.model(o.dtype)
        return self.seconds(model, self.inputs(model, self.read(files), o.ground_truth), o)

    def boost(self, files: Sequence[str], o: Options,
              progress: Callable[[int, int, str], None] | None = None) -> list[Boosted]:
        """Boosts every file with `o`, after checking all of them and the expected time; image
        i's noise is `fold_in(PRNGKey(seed), i)`, as `upsample --seed S --batch_size 1` draws."""
        model = self.model(o.dtype)
        items = self.inputs(model, self.read(files), o.ground_truth)
        sampler = model.options(solver=o.solver, num_steps=o.num_steps,
                                guidance_scale=o.guidance_scale)
        expected = self.seconds(model, items, o)
        if expected is not None and expected > self.max_seconds:
            raise UserError(f"this boost would take about {expected:.0f} s on this machine, over "
                            f"the page's limit of {self.max_seconds:.0f} s (--max_seconds): use "
                            "a smaller image, fewer images or fewer steps")
        out = []
        for i, (name, x, truth) in enumerate(items):
            if progress:
                progress(i, len(items), name)
            tile_progress = progress and (lambda t, n, name=name: progress(
                t, n, f"{name}, tile {t + 1} of {n}"))
            out.append(self._one(model, i, name, x, truth, o, sampler, tile_progress))
        return out

    def _one(self, model: Any, i: int, name: str, x: np.ndarray, truth: np.ndarray | None,
             o: Options, sampler: dict[str, Any],
             progress: Callable[[int, int], None] | None = None) -> Boosted:
        import jax
        rng = jax.random.fold_in(jax.random.PRNGKey(o.seed), i)
        shape, n = self.calls(x)
        start = time.perf_counter()
        if n == 1:
            result = model(x, rng, **sampler)
            images, compile_s = np.asarray(result.images), model.compile_seconds
            nfe = int(np.max(result.stats.get("nfe", 1)))
        else:
            images, nfe, compile_s = tiles.boost_in_tiles(model, x, self.tile, self.overlap, rng,
                                                          progress, **sampler)
        seconds = time.perf_counter() - start
        guided = 2 if o.guidance_scale != 1.0 else 1
        px = model.output_size(shape[1], shape[2])
        with self._lock:
            self.nfe_seen[o.solver] = nfe
            self.compiled.add(self._key(shape, o))
            self.rates.add(o.dtype, px[0] * px[1], nfe * guided, (seconds - compile_s) / n,
                           compile_s)
        h, w = images.shape[1:3]
        shown = side_by_side.panels(x, (h, w), images, truth)
        png = self._save(shown["CFM"][0], name, w, h)
        scores = ""
        if truth is not None:
            table = side_by_side.Scores()
            table.add([name], truth, **{k: images_lib.to_float(shown[k]) for k in ("CFM",
                                                                                  "bicubic")})
            scores = table.line(table.rows[name])
        return Boosted(name, shown["bicubic"][0], shown["CFM"][0],
                       None if truth is None else shown["ground truth"][0], png, nfe, seconds,
                       compile_s, scores)

    def _save(self, image: np.ndarray, name: str, w: int, h: int) -> str:
        from PIL import Image
        stem = os.path.splitext(name)[0]
        folder = tempfile.mkdtemp(dir=self.out_dir)        # one folder per boost: no clashes
        path = os.path.join(folder, f"{stem}_{w}x{h}.png")
        Image.fromarray(image).save(path)
        return path

    def warm_up(self, o: Options) -> None:
        """Boosts one small random image with `o`, so that the first estimate has a rate."""
        model = self.model(o.dtype)
        side = next((s for s in range(32, 257) if _takes(model, s)), 0)
        if side:
            x = np.random.default_rng(0).uniform(-1, 1, (1, side, side, 3)).astype(np.float32)
            sampler = model.options(solver=o.solver, num_steps=o.num_steps)
            self._one(model, 0, "warm-up.png", x, None, o, sampler)


def _takes(model: Any, side: int) -> bool:
    try:
        model.output_size(side, side)
    except ValueError:
        return False
    return True


# ------------------------------------------------------------------------ the page
def require_gradio() -> Any:
    try:
        import gradio
    except ImportError:
        raise UserError(f'the page needs Gradio: pip install "{GRADIO}"') from None
    return gradio


def example_photos(folder: str) -> list[str]:
    """`EXAMPLES` written to `folder` as PNGs of `EXAMPLE_SIDE` px on the long side."""
    import skimage.data
    from PIL import Image
    out = []
    for name in EXAMPLES:
        image = Image.fromarray(getattr(skimage.data, name)()).convert("RGB")
        image.thumbnail((EXAMPLE_SIDE, EXAMPLE_SIDE), Image.Resampling.LANCZOS)
        path = os.path.join(folder, f"{name}.png")
        image.save(path)
        out.append(path)
    return out


def solvers(model: Any) -> list[str]:
    """The solvers `model` can sample with (SDEs need a noised source)."""
    ok = []
    for solver in SOLVERS:
        try:
            model.options(solver=solver)
            ok.append(solver)
        except ValueError:
            pass
    return ok


def _options(solver: str, num_steps: float, seed: float, guidance: float, dtype: str,
             truth: bool) -> Options:
    return Options(solver, int(num_steps), int(seed or 0), float(guidance), dtype, bool(truth))


def _paths(files: Any) -> list[str]:
    files = files if isinstance(files, list) else [files] if files else []
    return [f if isinstance(f, str) else f.name for f in files]


def estimate_text(booster: Booster, files: Any, *controls: Any) -> str:
    """The line above the Boost button: what the boost should take, or why it cannot run."""
    if not files:
        return "Upload an image or pick an example."
    o = _options(*controls)
    try:
        seconds = booster.estimate(_paths(files), o)
    except cli.USER_ERRORS as err:
        return f"**Cannot boost:** {err}"
    if seconds is None:
        return "No estimate yet: the first boost measures this machine."
    over = f" — over the limit of {booster.max_seconds:.0f} s" if seconds > booster.max_seconds else ""
    return f"Expected: about {seconds:.1f} s on this machine{over}."


def boost_outputs(booster: Booster, files: Any, *controls: Any, progress: Any = None
                  ) -> tuple[Any, list, str, list[str]]:
    """The Boost button: (slider pair, side-by-side gallery, the figures, the PNGs); a user's
    mistake becomes an error on the page (`gr.Error`), not a traceback."""
    gr = require_gradio()
    report = progress and (lambda i, n, name: progress((i, n), desc=f"boosting {name}",
                                                       unit="images"))
    try:
        results = booster.boost(_paths(files), _options(*controls), report)
    except cli.USER_ERRORS as err:
        raise gr.Error(str(err), print_exception=False) from None
    gallery = [(side_by_side.comparison({"bicubic": r.bicubic, "CFM": r.cfm} | (
        {} if r.truth is None else {"ground truth": r.truth})), r.name) for r in results]
    lines = [f"**{r.name}**: {r.cfm.shape[1]}×{r.cfm.shape[0]} px, {r.nfe} NFE, "
             f"{r.seconds:.1f} s" + (f" (compile {r.compile_seconds:.1f} s)"
                                     if r.compile_seconds else "")
             + (f"; {r.scores}" if r.scores else "") for r in results]
    return ((results[0].bicubic, results[0].cfm), gallery, "\n\n".join(lines),
            [r.png for r in results])


def page(booster: Booster, defaults: Options, guided: bool, examples: Sequence[str],
         title: str) -> Any:
    """The Gradio page over `booster`."""
    gr = require_gradio()
    with gr.Blocks(title="fmboost_jax") as blocks:
        gr.Markdown(f"# fmboost_jax\n{title}")
        with gr.Row():
            with gr.Column():
                files = gr.File(label="Low-res image(s)", file_count="multiple",
                                file_types=["image"], elem_id="inputs")
                gr.Examples([[p] for p in examples], inputs=files, label="Example photos")
                solver = gr.Dropdown(solvers(booster.model(defaults.dtype)),
                                     value=defaults.solver, label="Solver")
                steps = gr.Slider(1, 100, value=defaults.num_steps, step=1, label="Steps")
                seed = gr.Number(defaults.seed, precision=0, label="Seed")
                guidance = gr.Slider(0.0, 5.0, value=defaults.guidance_scale, step=0.1,
                                     label="Guidance scale", visible=guided)
                dtype = gr.Radio(list(DTYPES), value=defaults.dtype, label="dtype")
                truth = gr.Checkbox(False, label="Ground truth: take the upload as the high-res "
                                                 "truth and score CFM and bicubic against it")
                expected = gr.Markdown("Upload an image or pick an example.", elem_id="estimate")
                button = gr.Button("Boost", variant="primary", elem_id="boost")
            with gr.Column():
                slider = gr.ImageSlider(label="bicubic | CFM", type="numpy", format="png",
                                        max_height=420, elem_id="slider")
                gallery = gr.Gallery(label="Side by side", format="png", height=280,
                                     object_fit="contain", elem_id="side-by-side")
                figures = gr.Markdown(elem_id="figures")
                download = gr.File(label="Full-resolution PNG", file_count="multiple",
                                   elem_id="download")
        controls = [files, solver, steps, seed, guidance, dtype, truth]
        for control in controls:
            control.change(lambda *a: estimate_text(booster, *a), controls, expected,
                           queue=False, api_visibility="private")

        def on_boost(*values, progress=gr.Progress()):  # noqa: B008 (how Gradio asks for it)
            return boost_outputs(booster, *values, progress=progress)

        outputs = [slider, gallery, figures, download]
        cleared = lambda: (None, [], "", None)   # no earlier result beside a new one or an error
        button.click(cleared, None, outputs, queue=False, api_visibility="private").then(
            on_boost, controls, outputs, api_name="boost", concurrency_limit=1)
    return blocks.queue(default_concurrency_limit=1)


# ------------------------------------------------------------------------ the command
def build_parser() -> argparse.ArgumentParser:
    p = cli.parser("fmboost_jax.app", __doc__)
    cli.add_model_arguments(p)
    p.add_argument("--host", default="127.0.0.1",
                   help="address to serve on (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=cli.at_least(0), default=7860, help="port (0: a free one)")
    p.add_argument("--share", action="store_true", help="also make a public gradio.live link")
    p.add_argument("--max_pixels", type=cli.at_least(1), default=MAX_PIXELS,
                   help="refuse uploads with more pixels, before decoding them")
    p.add_argument("--max_seconds", type=float, default=MAX_SECONDS,
                   help="refuse boosts expected to take longer on this machine")
    p.add_argument("--tile", type=cli.at_least(0), default=TILE,
                   help="boost low-res inputs larger than this many pixels in overlapping tiles "
                        "of this size, one at a time (0: whole)")
    p.add_argument("--tile_overlap", type=cli.at_least(0), default=TILE_OVERLAP,
                   help="pixels that neighbouring tiles share, blended")
    p.add_argument("--no_warm_up", action="store_true",
                   help="skip the small boost at start that measures this machine's rate")
    cli.add_compile_cache_argument(p)
    return p


def serve(args: argparse.Namespace) -> Any:
    """Loads the model, measures it and returns the page, launched (not blocking)."""
    from fmboost_jax.inference.upsampler import load_upsampler
    require_gradio()
    model = load_upsampler(args.model, args.config, vae=args.vae, dtype=args.dtype,
                           step=args.step)
    dtype = np.dtype(model.cfm.unet.dtype).name          # "auto" resolved for this device
    booster = Booster(lambda d: model if d == dtype else load_upsampler(
        args.model, args.config, vae=args.vae, dtype=d, step=args.step),
        args.max_pixels, args.max_seconds, tile=args.tile, overlap=args.tile_overlap)
    s = model.config.sampling
    defaults = Options(s.solver, s.num_steps, 0, s.guidance_scale, dtype)
    if not args.no_warm_up:
        booster.warm_up(defaults)
    guided = model.config.coupling.context_dropout > 0
    title = (f"`{os.path.basename(args.model.rstrip('/'))}`: {model.upscale}× "
             f"({model.config.first_stage.name}), step {model.step}")
    blocks = page(booster, defaults, guided, example_photos(booster.out_dir), title)
    blocks.launch(server_name=args.host, server_port=args.port or None, share=args.share,
                  prevent_thread_lock=True, allowed_paths=[booster.out_dir], quiet=True,
                  max_file_size=MAX_UPLOAD)
    print(f"fmboost_jax page: {blocks.local_url} (Ctrl-C stops it)", flush=True)
    blocks.fmboost_out_dir = booster.out_dir
    return blocks


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args, _ = cli.parse_args(parser, argv, blocks=())
    if args.tile and args.tile_overlap >= args.tile:
        parser.error(f"--tile_overlap {args.tile_overlap} must be smaller than --tile {args.tile}")
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    compile_cache.enable(off=args.no_compile_cache)
    with cli.user_errors_in_one_line():
        blocks = serve(args)
    try:
        blocks.block_thread()
    except KeyboardInterrupt:
        pass
    finally:
        blocks.close()
        shutil.rmtree(blocks.fmboost_out_dir, ignore_errors=True)   # the boosts' PNGs
    return 0


def console() -> None:
    """Console script `fmboost-app`."""
    cli.console(main)


if __name__ == "__main__":
    console()
