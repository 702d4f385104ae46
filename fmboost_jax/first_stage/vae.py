"""A frozen KL autoencoder of the Stable Diffusion family as the first stage (the paper's setup)."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from fmboost_jax import paths
from fmboost_jax.errors import UserError
from fmboost_jax.first_stage import tiling as tiling_lib
from fmboost_jax.models import autoencoder

Array = jax.Array
PyTree = Any
RANDOM_WEIGHTS = "random"      # the checkpoint name that means random weights


class AutoencoderFirstStage:
    """A frozen KL autoencoder (SD, SDXL, SD3, FLUX VAE): latents `(mode - shift) * scale`.

    Params come from an Orbax directory written by `python -m fmboost_jax.convert vae`, or are
    initialised at random when `checkpoint` is "random" (tests and smoke runs).

    With `tiling`, inputs larger than its `size` in pixels are coded in overlapping, cross-faded tiles
    (`tiling.py`), in three steps that keep memory at one tile's activations plus the whole
    image's features at the latent resolution (64x fewer positions than pixels):
    the network's levels above the latent resolution run tile by tile; the rest (the deepest
    level, the attention block, the output layers) runs on the whole latent, so attention stays
    global as in whole-image coding; and with `shared_stats` the tiles' GroupNorms share one
    estimate of the whole image's statistics, the mean of their own over a checkerboard half of
    the tiles (an extra pass over half the tiles), instead of each tile normalising with its own
    as most tiled VAEs do.
    """

    def __init__(self, config: autoencoder.AutoencoderConfig, checkpoint: str,
                 dtype: Any = jnp.float32, tiling: tiling_lib.TileOptions | None = None,
                 micro_batch: int = 0):
        self.config = config
        self.micro_batch = micro_batch     # > 0: images coded this many at a time (lax.map)
        self.model = autoencoder.AutoencoderKL(config, dtype)
        self.checkpoint = checkpoint
        self.scale_factor, self.shift_factor = config.scale_factor, config.shift_factor
        self.downsample_factor = config.downsample_factor
        self.latent_channels = config.z_channels
        self.tiling = tiling

    def init_params(self, rng: jax.Array) -> PyTree:
        if self.checkpoint == RANDOM_WEIGHTS:
            return autoencoder.init_params(self.model, rng)
        return load_autoencoder_params(self.checkpoint, self.model)

    def _apply(self, params: PyTree, x: Array, method: str, stats: PyTree | None = None) -> Any:
        variables = {"params": params}
        if stats is not None:
            variables[autoencoder.NORM_STATS] = stats
        return self.model.apply(variables, x, method=getattr(self.model, method))

    def _tiled_pixel_part(self, params: PyTree, x: Array, method: str, tile: int, overlap: int,
                          scale: float, out_channels: int) -> Array:
        """`method` (a pixel part) applied in tiles that share GroupNorm statistics."""
        align = max(1, round(1 / scale))
        stats = None
        if self.tiling.shared_stats:
            def measure(window):
                _, out = self.model.apply({"params": params}, window,
                                          method=getattr(self.model, method),
                                          mutable=[autoencoder.MEASURED_NORM_STATS])
                return out[autoencoder.MEASURED_NORM_STATS]
            stats = tiling_lib.tiled_mean(measure, x, tile, overlap, align, every_other=True)
        return tiling_lib.tiled_apply(lambda w: self._apply(params, w, method, stats), x, tile,
                                  overlap, scale, out_channels)

    def _tiles(self, x: Array, tile: int) -> bool:
        return self.tiling is not None and (x.shape[1] > tile or x.shape[2] > tile)

    def _in_micro_batches(self, fn: Any, x: Array) -> Any:
        """`fn(x)` for a batch x (B, ...), run `micro_batch` images at a time when B is larger:
        the activations of one micro-batch are alive at once, not the whole batch's."""
        k = self.micro_batch
        if k <= 0 or x.shape[0] <= k:
            return fn(x)
        one = lambda xi: jax.tree.map(lambda a: a[0], fn(xi[None]))
        return jax.lax.map(one, x, batch_size=k)

    def moments(self, params: PyTree, images: Array) -> tuple[Array, Array]:
        """Images (B, H, W, 3) in [-1, 1] -> unscaled posterior (mean, logvar), (B, H/8, W/8, C)."""
        return self._in_micro_batches(lambda x: self._moments(params, x), images)

    def _moments(self, params: PyTree, images: Array) -> tuple[Array, Array]:
        if not self._tiles(images, self.tiling and self.tiling.size):
            return self._apply(params, images, "encode")
        cfg = self.config
        h = self._tiled_pixel_part(params, images, "encode_pixel_part", self.tiling.size,
                                   self.tiling.overlap, 1 / self.downsample_factor,
                                   cfg.ch * cfg.ch_mult[-2])
        return self._apply(params, h, "encode_latent_part")

    def encode(self, params: PyTree, images: Array) -> Array:
        """Images -> scaled latents `(mode - shift) * scale`, no gradient."""
        mean, _ = self.moments(jax.lax.stop_gradient(params), images)
        return jax.lax.stop_gradient((mean - self.shift_factor) * self.scale_factor)

    def decode(self, params: PyTree, latents: Array) -> Array:
        """Scaled latents (B, h, w, C) -> images (B, 8h, 8w, 3) in about [-1, 1]."""
        z = latents / self.scale_factor + self.shift_factor
        return self._in_micro_batches(lambda x: self._decode(params, x), z)

    def _decode(self, params: PyTree, z: Array) -> Array:
        f = self.downsample_factor
        if not self._tiles(z, self.tiling and self.tiling.size // f):
            return self._apply(params, z, "decode")
        h = self._apply(params, z, "decode_latent_part")
        return self._tiled_pixel_part(params, h, "decode_pixel_part", self.tiling.size // f,
                                      self.tiling.overlap // f, f, self.config.out_channels)

def missing_checkpoint_message(path: str) -> str:
    """Why the VAE checkpoint `path` cannot be used and how to make one (after the field name)."""
    where = f"{path!r} does not exist" if path else "is empty"
    return (f"{where}: the VAE's weights are needed. Convert a "
            "PyTorch checkpoint (the SD VAE `sd_ae.ckpt` of latent diffusion, or diffusers' "
            "`vae/diffusion_pytorch_model.safetensors`) with\n"
            "    python -m fmboost_jax.convert vae --src FILE --dst DIR [--preset sd|sdxl|sd3|flux]\n"
            "and pass --config.first_stage.checkpoint=DIR (or set it in the config).")


def load_autoencoder_params(path: str, model: autoencoder.AutoencoderKL) -> PyTree:
    """Params of `model` from an Orbax directory written by `convert vae`."""
    import orbax.checkpoint as ocp
    if not paths.exists(path):
        raise FileNotFoundError("config.first_stage.checkpoint: " + missing_checkpoint_message(path))
    target = autoencoder.param_shapes(model)
    try:
        return ocp.StandardCheckpointer().restore(paths.resolve(path), target)
    except Exception as err:
        raise UserError(f"config.first_stage.checkpoint={path!r} does not hold the params of a "
                         f"{model.config.z_channels}-channel VAE with ch={model.config.ch}, "
                         f"ch_mult={model.config.ch_mult}: {type(err).__name__}: "
                         f"{str(err).strip()[:500]}") from err

