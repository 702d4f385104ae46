"""The held-out evaluator run during training: CFM against resize baselines (bilinear, bicubic).

`Evaluator(cfm, config, images, mesh).run(params, fs_params, rng)` samples the held-out images'
low-res versions with the config's sampler and scores them with `config.eval.metrics` (default
PSNR and SSIM; FID, KID and p-FID when `config.eval.inception` holds the Inception weights, as
`evaluation.benchmark` computes them); it also returns a grid (bilinear | CFM | ground truth).
The model samples at the held-out set's size, whatever size it trained at: output sizes follow
the input's.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from fmboost_jax.cfm import sampling
from fmboost_jax.cfm.model import CFM
from fmboost_jax.cfm.upsampling import resize
from fmboost_jax.data.images import to_uint8
from fmboost_jax.evaluation import benchmark
from fmboost_jax.models import inception
from fmboost_jax.parallel import sharding as sharding_lib

PyTree = Any


def image_grid(rows: list[list[np.ndarray]], min_tile: int = 128) -> np.ndarray:
    """Tiles images in [-1, 1] (each (H, W, 3)) into one uint8 grid, enlarged (nearest) to
    at least `min_tile` pixels per tile."""
    h = rows[0][0].shape[0]
    k = max(1, -(-min_tile // h))
    grid = np.concatenate([np.concatenate(r, axis=1) for r in rows], axis=0)
    return to_uint8(np.repeat(np.repeat(grid, k, axis=0), k, axis=1))


class Evaluator:
    """Samples the held-out set and scores CFM and `config.eval.baselines` with
    `config.eval.metrics`.

    The held-out images are split over the mesh's devices in chunks of `eval_batch_size`, each
    padded to a multiple of the device count (the padding rows are sampled and not scored); the
    per-image scores and the grid images come back replicated to every process.
    """

    def __init__(self, cfm: CFM, config: ml_collections.ConfigDict, images: np.ndarray,
                 mesh: jax.sharding.Mesh):
        self.cfm, self.mesh = cfm, mesh
        self.num_grid = min(config.num_grid_images, images.shape[0])
        chunk = config.eval_batch_size or config.batch_size
        self.chunks = [(sharding_lib.put_batch(images[i:i + chunk], mesh),
                        min(chunk, images.shape[0] - i))
                       for i in range(0, images.shape[0], chunk)]
        self.num_images, self.size = images.shape[0], images.shape[1]
        # throw=False: a solver failure is reported by `success` instead of a host callback,
        # which would gather the sharded batch onto one device.
        options = sampling.solver_options(config.sampling)
        self.sample = functools.partial(sampling.sample, cfm, **options, throw=False)
        self.solver = f"{options['solver']} (max_steps {options['max_steps']})"
        self._run_chunk = jax.jit(self.run_chunk, out_shardings=sharding_lib.replicated(mesh))
        e = config.eval
        self.baselines = benchmark.eval_names(config, "baselines")
        self.metrics = tuple(m for m in benchmark.eval_names(config, "metrics")
                             if m in benchmark.PIXEL_METRICS)
        self.fid_metrics = benchmark.training_fid_metrics(config)
        # The FID family (when config.eval asks and has Inception weights) scores the
        # predictions themselves, so they come back from the devices too.
        self.features = benchmark.InceptionFeatures(inception.load_inception(e.inception)) \
            if self.fid_metrics else None
        self.fid_options = dict(num_crops=e.num_crops, crop_size=e.crop_size)

    def run_chunk(self, params: PyTree, fs_params: PyTree, images: jax.Array, rng: jax.Array):
        """Per-image scores, grid rows, NFE and solver success of one chunk (B, S, S, 3)."""
        lr = self.cfm.lowres_images(images)
        out = self.sample(params, fs_params, lr, rng)
        size = images.shape[1:3]
        preds = {"cfm": jnp.clip(out.images, -1, 1)}
        for m in self.baselines:
            preds[m] = jnp.clip(resize(lr, size, m), -1, 1)
        scores = {f"{name}/{metric}": benchmark.PIXEL_METRICS[metric](x, images)
                  for name, x in preds.items() for metric in self.metrics}
        n = self.num_grid
        bilinear = jnp.clip(resize(lr[:n], size, "bilinear"), -1, 1)
        grid = jnp.stack([bilinear, preds["cfm"][:n], images[:n]], axis=1)
        kept = (images, preds) if self.features is not None else None
        return scores, grid, out.stats["nfe"], out.stats["success"], kept

    def run(self, params: PyTree, fs_params: PyTree, rng: jax.Array) -> tuple[dict, np.ndarray]:
        """Metrics {"cfm/psnr", ..., "nfe"} and a grid (bilinear | CFM | ground truth)."""
        sums: dict[str, float] = {}
        grid, nfe = None, 0
        fid = benchmark.FIDMetrics(self.features, ("cfm", *self.baselines), self.fid_metrics,
                                   **self.fid_options) if self.features is not None else None
        for i, (images, valid) in enumerate(self.chunks):
            scores, g, n, ok, kept = jax.device_get(
                self._run_chunk(params, fs_params, images, jax.random.fold_in(rng, i)))
            scores, g = {k: v[:valid] for k, v in scores.items()}, g[:valid]
            kept = None if kept is None else jax.tree.map(lambda a, v=valid: a[:v], kept)
            if not ok:
                raise RuntimeError(f"Evaluation: the sampler {self.solver} failed: an ODE solve "
                                   "that did not reach t = 1 (raise config.sampling.max_steps or "
                                   "loosen rtol/atol) or an SDE sample that is not finite (lower "
                                   "config.sampling.diffusion_norm or take more steps)")
            for k, v in scores.items():
                sums[k] = sums.get(k, 0.0) + float(np.sum(v))
            grid = g if grid is None else grid
            nfe = max(nfe, int(n))
            if fid is not None:
                fid.update(*kept)
        results = {k: v / self.num_images for k, v in sums.items()}
        for method, values in (fid.results() if fid is not None else {}).items():
            results.update({f"{method}/{k}": v for k, v in values.items()})
        results["nfe"] = nfe
        rows = [list(r) for r in np.asarray(grid)[:self.num_grid]]
        return results, image_grid(rows)
