"""Judging an upsampler as the paper does: CFM and resize baselines against the ground truth.

    bench = Benchmark(("cfm", "bicubic"), metrics=("psnr", "fid", "pfid"), features=features)
    bench.update(truth, {"cfm": boosted, "bicubic": resized})      # (B, H, W, 3) in [-1, 1]
    bench.results()   # {"cfm": {"psnr": ..., "fid": ..., "pfid": ...}, "bicubic": {...}}

The metrics (`METRICS`), every one computed on the predictions clipped to [-1, 1], as they are
saved and as the held-out evaluator scores them:

* `psnr` (dB, on [0, 1]), `ssim` and `mse` (on [-1, 1]) per image (`evaluation.metrics`),
  averaged over the images;
* `fid`: the Frechet distance of Inception pool3 features of the whole images, on their uint8
  levels as the reference's torchmetrics FID (the trace from eigenvalues, as torchmetrics; for
  fewer images than the 2048 dimensions, exactly, from the generated set's features);
* `kid`: the kernel inception distance, `kid_mean` and `kid_std` over subsets (torchmetrics'
  defaults) of the first `KID_MAX_SAMPLES` features;
* `pfid`: patch FID, the reference's: `num_crops` random `crop_size`² crops per image, at the
  same positions in the ground truth and in every method's image (`fid.crop_positions`).

Batches stream through: only running sums, feature statistics and the first features of each
set (for KID and FID of few images) are kept.
The real side's features are computed once per batch for all methods, and every Inception
input of a batch goes through the network in fixed-size chunks (`InceptionFeatures`), so one
compiled program serves all image and crop sizes. `run` drives an `Upsampler` over batches of
ground truth; `python -m fmboost_jax.evaluate` is its command line.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from fmboost_jax import paths
from fmboost_jax.cfm.upsampling import resize
from fmboost_jax.config import CROP_SIZE, NUM_CROPS
from fmboost_jax.errors import ConfigError, UserError, parse_names
from fmboost_jax.evaluation import fid as fid_lib
from fmboost_jax.evaluation import metrics as metrics_lib
from fmboost_jax.models import inception

PIXEL_METRICS = {"psnr": metrics_lib.psnr, "ssim": metrics_lib.ssim, "mse": metrics_lib.mse}
FID_METRICS = ("fid", "pfid", "kid")
METRICS = (*FID_METRICS, *PIXEL_METRICS)
BASELINES = ("nearest", "bilinear", "bicubic", "lanczos3", "lanczos5")   # jax.image.resize's
KID_SUBSETS, KID_SUBSET_SIZE = 100, 1000  # torchmetrics' KID defaults
KID_MAX_SAMPLES = 10_000                  # features per set kept for KID (2048 floats each)
FEW_SAMPLES = inception.FEATURES          # features per set kept for FID from few images
KINDS = ("whole", "patch")                # features of whole images (FID, KID), crops (p-FID)
INCEPTION_BATCH = 32                      # network inputs (299²) per Inception call
INCEPTION_VARIABLE, INCEPTION_DIR = "FMBOOST_INCEPTION", "~/fmboost/inception"
INCEPTION_SOURCE = "pt_inception-2015-12-05-6726825d.pth"


# ------------------------------------------------------------------------ names and checks
def check_crop(num_crops: int, crop_size: int, image_size: int, what: str = "--crop_size"
               ) -> None:
    """ValueError unless `num_crops` >= 1 crops of `crop_size`² fit `image_size`² images."""
    if num_crops < 1:
        raise UserError(f"p-FID needs at least 1 crop per image, got num_crops={num_crops}")
    if not 1 <= crop_size <= image_size:
        raise UserError(f"{what} {crop_size} does not fit the {image_size}x{image_size} images "
                         f"(p-FID crops must be 1 to {image_size} px)")


def default_inception() -> str:
    """Where the converted Inception weights are looked for: $FMBOOST_INCEPTION, else
    ~/fmboost/inception."""
    return os.environ.get(INCEPTION_VARIABLE) or INCEPTION_DIR


def convert_command(dst: str) -> str:
    """How to make the Inception weights `dst`: pytorch-fid's file, converted."""
    return (f"`python -m fmboost_jax.convert inception --src {INCEPTION_SOURCE} --dst {dst}` "
            "(the file pytorch-fid downloads from its GitHub release)")


def missing_inception(path: str, skipped: Sequence[str] = FID_METRICS) -> str:
    """The one line that says the `skipped` metrics (FID, p-FID, KID) are skipped and how to
    get the Inception weights."""
    return f"skipping {', '.join(skipped)}: no Inception weights at {path!r}; make them with " \
        + convert_command(path)


def eval_names(config: Any, field: str) -> tuple[str, ...]:
    """`config.eval.metrics` or `.baselines` as names; ConfigError naming an unknown one."""
    known = {"metrics": METRICS, "baselines": BASELINES}[field]
    try:
        return parse_names(config.eval[field], known, f"config.eval.{field}")
    except ValueError as err:
        raise ConfigError(f"eval.{field}", str(err).split(": ", 1)[1]) from None


def check_config(config: Any) -> None:
    """The rules of `config.eval` (pure); p-FID crops must fit the held-out images."""
    e = config.eval
    eval_names(config, "baselines")
    if "pfid" in eval_names(config, "metrics"):
        try:
            check_crop(e.num_crops, e.crop_size, config.data.eval_crop_size
                       or config.high_res_size, "crop size")
        except ValueError as err:
            raise ConfigError("eval.crop_size", f"{err} (config.eval.num_crops "
                              f"{e.num_crops}, crop_size {e.crop_size})") from None


def training_fid_metrics(config: Any) -> tuple[str, ...]:
    """The FID family the held-out evaluation during training computes: those of
    `config.eval.metrics` when `config.eval.inception` is set, else none (with a warning)."""
    e = config.eval
    asked = tuple(m for m in eval_names(config, "metrics") if m in FID_METRICS)
    if asked and not e.inception:
        logging.warning("config.eval.metrics asks for %s, but config.eval.inception is empty: "
                        "skipped. Make the weights with %s and set config.eval.inception=DIR",
                        ", ".join(asked), convert_command("DIR"))
        return ()
    return asked


def check_resources(config: Any) -> None:
    """At start-up: ConfigError naming `eval.inception` when the FID family is asked for and
    the weights it names are missing."""
    e = config.eval
    asked = any(m in FID_METRICS for m in eval_names(config, "metrics"))
    if asked and e.inception and not paths.exists(e.inception):
        raise ConfigError("eval.inception", f"{e.inception!r} does not exist: fid, kid and pfid "
                          f"need the Inception weights; make them with "
                          f"{convert_command(e.inception)}")


# ------------------------------------------------------------------------ features
@jax.jit
def _network(variables: inception.Variables, x: jax.Array) -> jax.Array:
    return inception.InceptionV3().apply(variables, x)


_preprocess = jax.jit(inception.preprocess)


class InceptionFeatures:
    """Inception pool3 features of images in [0, 1], any size: `features(images)` (B, H, W, 3)
    -> (B, 2048) float32; `features.many([a, b])` for several arrays in one pass. Inputs are
    resized to 299² and run through the network in chunks of `batch` (default `INCEPTION_BATCH`,
    rounded up to a multiple of the local devices, which each chunk is split over; the last
    chunk padded)."""

    def __init__(self, variables: inception.Variables, batch: int | None = None):
        devices = jax.local_devices()
        mesh = jax.sharding.Mesh(np.array(devices), ("batch",))
        self.variables = jax.device_put(variables, jax.sharding.NamedSharding(
            mesh, jax.sharding.PartitionSpec()))
        self.split = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("batch"))
        self.batch = -(-(batch or INCEPTION_BATCH) // len(devices)) * len(devices)

    def __call__(self, images: Any) -> np.ndarray:
        return self.many([images])[0]

    def many(self, groups: Sequence[Any]) -> list[np.ndarray]:
        """Features (B_i, 2048) of each array of images (B_i, H_i, W_i, 3) in [0, 1]."""
        x = jnp.concatenate([_preprocess(jnp.asarray(g, jnp.float32)) for g in groups])
        n, pad = x.shape[0], -x.shape[0] % self.batch
        x = jnp.concatenate([x, jnp.zeros((pad, *x.shape[1:]), x.dtype)]) if pad else x
        chunks = (jax.device_put(x[i:i + self.batch], self.split)
                  for i in range(0, x.shape[0], self.batch))
        feats = np.concatenate([np.asarray(_network(self.variables, c)) for c in chunks])[:n]
        return np.split(feats, np.cumsum([len(g) for g in groups])[:-1])


# ------------------------------------------------------------------------ running scores
@functools.partial(jax.jit, static_argnums=0)
def _pixel_scores(names: tuple[str, ...], pred: jax.Array, truth: jax.Array
                  ) -> dict[str, jax.Array]:
    return {m: PIXEL_METRICS[m](pred, truth) for m in names}


class PixelMetrics:
    """Running means of per-image PSNR, SSIM and MSE of each method."""

    def __init__(self, methods: Sequence[str], metrics: Sequence[str]):
        self.metrics = tuple(m for m in metrics if m in PIXEL_METRICS)
        self.sums = {m: dict.fromkeys(self.metrics, 0.0) for m in methods}
        self.count = 0

    def update(self, truth: Any, preds: dict[str, Any]) -> None:
        """Ground truth (B, H, W, 3) and each method's clipped prediction, in [-1, 1]."""
        if not self.metrics:
            return
        for method, pred in preds.items():
            scores = jax.device_get(_pixel_scores(self.metrics, pred, truth))
            for m, v in scores.items():
                self.sums[method][m] += float(np.sum(np.asarray(v, np.float64)))
        self.count += int(truth.shape[0])

    def results(self) -> dict[str, dict[str, float]]:
        return {method: {m: v / self.count for m, v in sums.items()}
                for method, sums in self.sums.items()} if self.count else {}


class FIDMetrics:
    """FID, KID and p-FID of each method against the same real images, streamed.

    Per batch the real images' features are computed once; p-FID crops are drawn from
    `crop_seed` as `fid.FIDAccumulator` draws them (the same positions for the real and every
    method's image), so an accumulator with that seed sees the same crops. Each set keeps its
    running statistics and its first features (`FEW_SAMPLES`, or `kid_max_samples` for KID):
    a method with fewer images than feature dimensions gets its FID from those, exactly and
    without a 2048 x 2048 eigen-decomposition (`fid.frechet_distance_to_samples`).
    """

    def __init__(self, features: InceptionFeatures | Callable, methods: Sequence[str],
                 metrics: Sequence[str], num_crops: int = NUM_CROPS, crop_size: int = CROP_SIZE,
                 crop_seed: int = 0, kid_max_samples: int = KID_MAX_SAMPLES):
        self.features = features
        self.metrics = tuple(m for m in metrics if m in FID_METRICS)
        self.num_crops, self.crop_size = num_crops, crop_size
        self._crop_rng = np.random.default_rng(crop_seed)
        self.sides = ("real", *methods)
        self.stats = {(s, k): fid_lib.FeatureStats() for s in self.sides for k in KINDS}
        self.kid_max_samples = kid_max_samples
        keep = {"whole": max(FEW_SAMPLES, kid_max_samples if "kid" in self.metrics else 0),
                "patch": FEW_SAMPLES}
        self.banks = {(s, k): fid_lib.FeatureBank(keep[k]) for s in self.sides for k in KINDS}

    def _groups(self, images: dict[str, np.ndarray]) -> dict[tuple[str, str], np.ndarray]:
        """(side, "whole" | "patch") -> images in [0, 1] to take features of."""
        groups = {}
        if "fid" in self.metrics or "kid" in self.metrics:
            groups.update({(s, "whole"): x for s, x in images.items()})
        if "pfid" in self.metrics:
            b, h, w = images["real"].shape[:3]
            pos = fid_lib.crop_positions(self._crop_rng, (h, w), b * self.num_crops,
                                         self.crop_size).reshape(b, self.num_crops, 2)
            groups.update({(s, "patch"): fid_lib.extract_crops(x, pos, self.crop_size)
                           for s, x in images.items()})
        return groups

    def update(self, truth: Any, preds: dict[str, Any]) -> None:
        """Ground truth (B, H, W, 3) and each method's clipped prediction, in [-1, 1]."""
        if not self.metrics:
            return
        images = {s: fid_lib.quantize_uint8(np.asarray(x, np.float32) * 0.5 + 0.5)
                  for s, x in {"real": truth, **preds}.items()}
        groups = self._groups(images)
        many = getattr(self.features, "many", None)
        feats = many(list(groups.values())) if many else [self.features(g) for g in groups.values()]
        for key, f in zip(groups, feats):
            self.stats[key].update(f)
            self.banks[key].update(np.asarray(f, np.float32))

    def _fid(self, side: str, kind: str) -> float:
        """FID of `side` against the real set: from the kept features when they are all of
        them and fewer than their dimension, else from the two covariances."""
        real, fake, bank = self.stats["real", kind], self.stats[side, kind], self.banks[side, kind]
        if bank.seen <= bank.max_samples and fake.count < fake.mean.shape[0]:
            g = real.gaussian()
            return fid_lib.frechet_distance_to_samples(g.mu, g.sigma, bank.features)
        return fid_lib.fid_from_stats(real, fake, method="eigh")

    def results(self) -> dict[str, dict[str, float]]:
        """{method: {"fid", "kid_mean", "kid_std", "pfid"}}: those asked for."""
        out = {}
        for side in self.sides[1:]:
            r = {}
            if "fid" in self.metrics:
                r["fid"] = self._fid(side, "whole")
            if "kid" in self.metrics:
                n = self.kid_max_samples
                r["kid_mean"], r["kid_std"] = fid_lib.kernel_inception_distance(
                    self.banks["real", "whole"].features[:n],
                    self.banks[side, "whole"].features[:n], KID_SUBSETS, KID_SUBSET_SIZE)
            if "pfid" in self.metrics:
                r["pfid"] = self._fid(side, "patch")
            out[side] = r
        return out


class Benchmark:
    """The pixel metrics and (with `features`) the FID family of each method against the
    ground truth; `update` per batch, `results` at the end."""

    def __init__(self, methods: Sequence[str], metrics: Sequence[str] = METRICS,
                 features: InceptionFeatures | Callable | None = None, **fid_options: Any):
        self.methods = tuple(methods)
        self.pixel = PixelMetrics(self.methods, metrics)
        fid_metrics = [m for m in metrics if m in FID_METRICS] if features is not None else []
        self.fid = FIDMetrics(features, self.methods, fid_metrics, **fid_options) \
            if fid_metrics else None
        self.num_images = 0

    def update(self, truth: Any, preds: dict[str, Any]) -> None:
        """Ground truth (B, H, W, 3) in [-1, 1] and each method's prediction (clipped here)."""
        preds = {k: jnp.clip(jnp.asarray(v, jnp.float32), -1.0, 1.0) for k, v in preds.items()}
        self.pixel.update(truth, preds)
        if self.fid is not None:
            self.fid.update(np.asarray(truth), {k: np.asarray(v) for k, v in preds.items()})
        self.num_images += int(truth.shape[0])

    def results(self) -> dict[str, dict[str, float]]:
        """{method: {metric: value}}; ValueError when the FID family has fewer than 2 images."""
        if self.fid is not None and self.num_images < 2:
            raise UserError(f"FID and KID need at least 2 images, got {self.num_images}")
        out = {m: {} for m in self.methods}
        for part in (self.pixel.results(), self.fid.results() if self.fid else {}):
            for method, scores in part.items():
                out[method].update(scores)
        return out


# ------------------------------------------------------------------------ the driver
def baselines(lowres: jax.Array, size: tuple[int, int], methods: Sequence[str]
              ) -> dict[str, jax.Array]:
    """The low-res images (B, h, w, 3) resized to `size` by each of `methods` (`BASELINES`)."""
    return {m: resize(lowres, size, m) for m in methods}


def batches(images: Iterable[np.ndarray], batch_size: int) -> Iterable[np.ndarray]:
    """Images (S, S, 3) -> stacked batches (B, S, S, 3) of `batch_size` (the last smaller)."""
    batch: list[np.ndarray] = []
    for image in images:
        batch.append(image)
        if len(batch) == batch_size:
            yield np.stack(batch)
            batch = []
    if batch:
        yield np.stack(batch)


def run(upsampler: Any, truth_batches: Iterable[np.ndarray], bench: Benchmark,
        options: dict[str, Any], seed: int = 0, baseline_methods: Sequence[str] = (),
        on_batch: Callable[[int], None] | None = None,
        others: dict[str, tuple[Any, dict[str, Any]]] | None = None) -> dict[str, Any]:
    """Down-samples each ground-truth batch (B, H, W, 3) as in training, boosts it with
    `upsampler` (sampler `options`, noise from `seed` folded with the batch index) and scores
    CFM, the `others` (name -> (upsampler, options): more models on the same low-res inputs,
    e.g. the regression baseline) and the `baseline_methods` in `bench`. Returns {"nfe",
    "nfe_max"}: the CFM model's network evaluations per image, the mean and the largest;
    `on_batch(n)` after each batch of n images."""
    key = jax.random.PRNGKey(seed)
    nfe_sum, nfe_max = 0.0, 0
    for i, truth in enumerate(truth_batches):
        lowres = upsampler.downsample(truth)
        out = upsampler(lowres, jax.random.fold_in(key, i), **options)
        preds = {"cfm": out.images}
        for name, (other, other_options) in (others or {}).items():
            preds[name] = other(lowres, jax.random.fold_in(key, i), **other_options).images
        preds.update(baselines(lowres, truth.shape[1:3], baseline_methods))
        bench.update(truth, preds)
        nfe = np.broadcast_to(np.asarray(out.stats["nfe"]), (truth.shape[0],))
        nfe_sum, nfe_max = nfe_sum + float(nfe.sum()), max(nfe_max, int(nfe.max()))
        if on_batch is not None:
            on_batch(truth.shape[0])
    n = max(bench.num_images, 1)
    return {"nfe": nfe_sum / n, "nfe_max": nfe_max}
