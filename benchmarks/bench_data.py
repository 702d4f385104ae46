"""Input-pipeline throughput: can one host feed the training step of configs/lhq.py?

    python benchmarks/bench_data.py                 # 1024² JPEGs and latent records, 0 and 2 workers
    python benchmarks/bench_data.py --workers 0,4,8 --batches 20

Measures images/s of this process for (a) the image pipeline (grain: read, decode, resize,
random crop, flip, batch) on 1024² JPEGs made from scikit-image's photos, (b) reading latent
records (128² x 4 moments, as precompute_latents writes for 1024² images), (c) the
anti-aliased low-res down-sampling that the model then runs on the device (here on the CPU),
and (d) (a) and (c) in one loop, with the best worker count of (a).
It compares them with the rate one host must sustain, from a training step time derived from
the UNet's FLOPs (README/REFERENCE: ~452 GFLOPs forward per 128² latent, x3 for forward and
backward) at an assumed model-FLOP utilisation of the chips' dense bf16 peak.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from arguments import numbers  # noqa: E402  (benchmarks/ is on sys.path: this file's folder)
from machine import describe  # noqa: E402

TRAIN_FLOPS_PER_IMAGE = 3 * 452e9        # fwd + bwd of the released UNet at a 128² latent
LHQ_BATCH = 64                           # configs/lhq.py
CHIPS = {"H100 (8 per host)": (989e12, 8), "TPU v4 (4 per host)": (275e12, 4),
         "TPU v5e (8 per host)": (197e12, 8)}


def make_jpegs(folder: str, n: int, size: int) -> None:
    import skimage.data
    from PIL import Image
    names = ("astronaut", "chelsea", "coffee", "rocket", "retina", "hubble_deep_field")
    for i in range(n):
        img = Image.fromarray(getattr(skimage.data, names[i % len(names)])()[..., :3])
        scale = size / min(img.size)
        img = img.resize((max(size, round(img.width * scale)), max(size, round(img.height * scale))),
                         Image.Resampling.BICUBIC)
        img.save(os.path.join(folder, f"img{i:04d}.jpg"), quality=95)


def make_latent_records(folder: str, n: int, latent: int) -> None:
    from array_record.python.array_record_module import ArrayRecordWriter

    from fmboost_jax.data.sources import encode_latent_record
    rng = np.random.default_rng(0)
    writer = ArrayRecordWriter(os.path.join(folder, "latents-p000000-of-000001-c00000.array_record"),
                               "group_size:1")
    for _ in range(n):
        z = lambda: rng.standard_normal((latent, latent, 4)).astype(np.float32)
        writer.write(encode_latent_record({"mean": z(), "logvar": z(), "mean_lowres": z(),
                                           "logvar_lowres": z()}))
    writer.close()


def rate(it, batches: int, batch: int) -> float:
    next(it)                                  # start-up (workers, first reads)
    t0 = time.perf_counter()
    for _ in range(batches):
        next(it)
    return batches * batch / (time.perf_counter() - t0)


class Lowres:
    """Batches of an iterator with their low-res images computed (and waited for)."""

    def __init__(self, it, down):
        self.it, self.down = it, down

    def __next__(self):
        from fmboost_jax.data.images import to_float
        batch = next(self.it)
        batch["lowres"] = self.down(to_float(batch["image"])).block_until_ready()  # uint8 in
        return batch


def best_workers(results: dict[str, float]) -> int:
    rates = {int(k.split(", ")[1].split()[0]): v for k, v in results.items()
             if k.startswith("images, ")}
    return max(rates, key=rates.get)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, default=1024)
    ap.add_argument("--images", type=int, default=48, help="JPEG files to make")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--batches", type=int, default=12)
    ap.add_argument("--workers", type=numbers(int), default="0,2",
                    help="grain worker processes to try, comma-separated")
    ap.add_argument("--mfu", type=float, default=0.4, help="assumed model-FLOP utilisation")
    args = ap.parse_args()

    from absl import flags
    flags.FLAGS.mark_as_parsed()
    import jax
    import jax.numpy as jnp

    from fmboost_jax.cfm.upsampling import resize
    from fmboost_jax.config import base_config
    from fmboost_jax.data import pipeline

    print(describe())

    with tempfile.TemporaryDirectory() as tmp:
        jpegs, recs = os.path.join(tmp, "jpegs"), os.path.join(tmp, "latents")
        os.makedirs(jpegs), os.makedirs(recs)
        make_jpegs(jpegs, args.images, args.size)
        make_latent_records(recs, args.images * 4, args.size // 8)
        c = base_config()
        c.high_res_size, c.low_res_size, c.batch_size = args.size, args.size // 2, args.batch
        c.data.update(name="folder", path=jpegs, num_eval_images=0)
        results = {}
        for w in args.workers:
            c.data.worker_count = w
            it = pipeline.create_train_iterator(c)
            results[f"images, {w} workers"] = rate(it, args.batches, args.batch)
            if hasattr(it, "close"):
                it.close()
        c.data.update(name="latents", path=recs)
        for w in args.workers:
            c.data.worker_count = w
            it = pipeline.create_train_iterator(c)
            results[f"latent records, {w} workers"] = rate(it, args.batches * 4, args.batch)
            if hasattr(it, "close"):
                it.close()
        down = jax.jit(lambda x: resize(x, (args.size // 2, args.size // 2), "bilinear", True))
        x = jnp.zeros((args.batch, args.size, args.size, 3))
        down(x).block_until_ready()
        t0 = time.perf_counter()
        for _ in range(3):
            down(x).block_until_ready()
        results["low-res down-sampling (jax, CPU)"] = 3 * args.batch / (time.perf_counter() - t0)
        # The whole image path in one loop, the down-sampling on this CPU as well (training
        # runs it on the accelerator).
        c.data.update(name="folder", path=jpegs, worker_count=best_workers(results))
        it = pipeline.create_train_iterator(c)
        with_down = Lowres(it, down)
        results[f"images + down-sampling, {c.data.worker_count} workers"] = rate(
            with_down, args.batches, args.batch)
        if hasattr(it, "close"):
            it.close()

    for name, r in results.items():
        print(f"{name:40s} {r:8.1f} images/s per process")
    print(f"\nAssumed training step of configs/lhq.py (batch {LHQ_BATCH}, released UNet at a 128² "
          f"latent): {TRAIN_FLOPS_PER_IMAGE / 1e12:.2f} TFLOP per image (452 GFLOPs forward, x3 for "
          f"forward + backward) at {args.mfu:.0%} of each chip's dense bf16 peak, one host:")
    best = lambda prefix: max(v for k, v in results.items() if k.startswith(prefix))
    for chip, (peak, per_host) in CHIPS.items():
        need = per_host * peak * args.mfu / TRAIN_FLOPS_PER_IMAGE
        step_ms = 1e3 * LHQ_BATCH / need
        verdict = "keeps up" if best("latent records") >= need else \
            f"needs {need / best('latent records'):.1f}x this machine's rate (more workers/cores)"
        print(f"  {chip:22s} step {step_ms:6.1f} ms -> {need:6.0f} images/s; latent records: "
              f"{verdict}")
    # Encoding on the fly runs the VAE encoder twice per image (image and PSU input).
    from fmboost_jax.first_stage import AutoencoderFirstStage
    from fmboost_jax.models import autoencoder as ae
    from fmboost_jax.train.meter import flops_of
    fs = AutoencoderFirstStage(ae.preset("sd"), checkpoint="random")
    params = jax.eval_shape(fs.init_params, jax.random.PRNGKey(0))
    image = jax.ShapeDtypeStruct((1, args.size, args.size, 3), jnp.float32)
    enc = flops_of(jax.jit(fs.encode).lower(params, image).compile())
    if enc:
        per_image = TRAIN_FLOPS_PER_IMAGE + 2 * enc
        print(f"\nencoding on the fly: the SD encoder costs {enc / 1e12:.2f} TFLOP per {args.size}² "
              f"image (XLA count), so a step costs {per_image / 1e12:.2f} TFLOP per image:")
        for chip, (peak, per_host) in CHIPS.items():
            need = per_host * peak * args.mfu / per_image
            verdict = "keeps up" if best("images") >= need else \
                f"needs {need / best('images'):.1f}x this machine's rate (more workers/cores)"
            print(f"  {chip:22s} step {1e3 * LHQ_BATCH / need:6.1f} ms -> {need:6.0f} images/s; "
                  f"image pipeline: {verdict}")


if __name__ == "__main__":
    main()
