"""The held-out evaluator run during training: CFM against bilinear and bicubic up-sampling.

`Evaluator(cfm, config, images, mesh).run(params, fs_params, rng)` samples the held-out images'
low-res versions with the config's sampler and scores them with PSNR and SSIM; it also returns a
grid (bilinear | CFM | ground truth). The model samples at the held-out set's size, whatever
size it trained at: output sizes follow the input's.
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
from fmboost_jax.evaluation import metrics as metrics_lib
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
    """Samples the held-out set and scores CFM, bilinear and bicubic with PSNR and SSIM.

    The held-out images are split over the mesh's devices in chunks of `eval_batch_size`; the
    per-image scores and the grid images come back replicated to every process.
    """

    def __init__(self, cfm: CFM, config: ml_collections.ConfigDict, images: np.ndarray,
                 mesh: jax.sharding.Mesh):
        self.cfm, self.mesh = cfm, mesh
        self.num_grid = min(config.num_grid_images, images.shape[0])
        chunk = config.eval_batch_size or config.batch_size
        self.chunks = [sharding_lib.put_batch(images[i:i + chunk], mesh)
                       for i in range(0, images.shape[0], chunk)]
        self.num_images, self.size = images.shape[0], images.shape[1]
        # throw=False: a solver failure is reported by `success` instead of a host callback,
        # which would gather the sharded batch onto one device.
        options = sampling.solver_options(config.sampling)
        self.sample = functools.partial(sampling.sample, cfm, **options, throw=False)
        self.solver = f"{options['solver']} (max_steps {options['max_steps']})"
        self._run_chunk = jax.jit(self.run_chunk, out_shardings=sharding_lib.replicated(mesh))

    def run_chunk(self, params: PyTree, fs_params: PyTree, images: jax.Array, rng: jax.Array):
        """Per-image scores, grid rows, NFE and solver success of one chunk (B, S, S, 3)."""
        lr = self.cfm.lowres_images(images)
        out = self.sample(params, fs_params, lr, rng)
        size = images.shape[1:3]
        preds = {"cfm": jnp.clip(out.images, -1, 1)}
        for m in ("bilinear", "bicubic"):
            preds[m] = jnp.clip(resize(lr, size, m), -1, 1)
        scores = {f"{name}/{metric}": fn(x, images)
                  for name, x in preds.items()
                  for metric, fn in (("psnr", metrics_lib.psnr), ("ssim", metrics_lib.ssim))}
        n = self.num_grid
        grid = jnp.stack([preds["bilinear"][:n], preds["cfm"][:n], images[:n]], axis=1)
        return scores, grid, out.stats["nfe"], out.stats["success"]

    def run(self, params: PyTree, fs_params: PyTree, rng: jax.Array) -> tuple[dict, np.ndarray]:
        """Metrics {"cfm/psnr", ..., "nfe"} and a grid (bilinear | CFM | ground truth)."""
        sums: dict[str, float] = {}
        grid, nfe = None, 0
        for i, images in enumerate(self.chunks):
            scores, g, n, ok = jax.device_get(
                self._run_chunk(params, fs_params, images, jax.random.fold_in(rng, i)))
            if not ok:
                raise RuntimeError(f"Evaluation: the ODE solver {self.solver} did not reach t = 1 "
                                   "(raise config.sampling.max_steps or loosen rtol/atol)")
            for k, v in scores.items():
                sums[k] = sums.get(k, 0.0) + float(np.sum(v))
            grid = g if grid is None else grid
            nfe = max(nfe, int(n))
        results = {k: v / self.num_images for k, v in sums.items()}
        results["nfe"] = nfe
        rows = [list(r) for r in np.asarray(grid)[:self.num_grid]]
        return results, image_grid(rows)
