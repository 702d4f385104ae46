"""Coupling Flow Matching: the pieces of the paper put together for one batch.

`CFM` bundles the UNet, the first stage, the coupling and the flow path. Given a
batch of high-res images it builds the training pair the reference builds
(`extract_from_batch` + `get_source_and_context`):

    x1      = encode(image)                       or batch["latent"] * scale_factor
    lowres  = downsample(image, low_res_size)
    x0, ctx = coupling(lowres)                    (PSU: encode(bilinear_up(lowres)))

and regresses v(x_t, t, ctx) onto u_t. `CFM` holds no parameters: UNet params and
first-stage params are explicit arguments.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import jax
import jax.numpy as jnp

from fmboost_jax import flow
from fmboost_jax.coupling import Coupling, resize
from fmboost_jax.first_stage import FirstStage, first_stage_from_config
from fmboost_jax.models.unet import EfficientUNet, unet_from_config

Array = jax.Array
PyTree = Any

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


@dataclasses.dataclass(frozen=True)
class CFM:
    unet: EfficientUNet
    first_stage: FirstStage
    coupling: Coupling
    low_res_size: int
    high_res_size: int
    schedule: str = "linear"
    sigma_min: float = 0.0
    lowres_downsampling: str = "bilinear"
    lowres_antialias: bool = True

    @classmethod
    def from_config(cls, config: Any) -> "CFM":
        c = config.coupling
        coupling = Coupling(
            upsampling_mode=c.upsampling_mode,
            upsampling_mode_context=c.upsampling_mode_context or None,
            start_from_noise=c.start_from_noise, noising_step=c.noising_step,
            concat_context=c.concat_context, num_timesteps=c.num_timesteps)
        flow.get_path(config.flow.schedule, config.flow.sigma_min)  # validates the pair
        return cls(unet=unet_from_config(config.unet, DTYPES[config.dtype]),
                   first_stage=first_stage_from_config(config), coupling=coupling,
                   low_res_size=config.low_res_size, high_res_size=config.high_res_size,
                   schedule=config.flow.schedule, sigma_min=config.flow.sigma_min,
                   lowres_downsampling=config.lowres_downsampling,
                   lowres_antialias=config.lowres_antialias)

    @property
    def path(self) -> flow.Path:
        return flow.get_path(self.schedule, self.sigma_min)

    @property
    def latent_size(self) -> int:
        return self.high_res_size // self.first_stage.downsample_factor

    # ---------------------------------------------------------------- parameters
    def init_params(self, rng: jax.Array, batch_size: int = 1) -> PyTree:
        """UNet params (float32) for latents of the high-res size."""
        z = jnp.zeros((batch_size, self.latent_size, self.latent_size,
                       self.first_stage.latent_channels), jnp.float32)
        ctx = z if self.coupling.uses_context else None
        return self.unet.init(rng, z, jnp.zeros((batch_size,)), ctx)["params"]

    def velocity(self, params: PyTree, x: Array, t: Array, context: Array | None,
                 train: bool = False, rng: jax.Array | None = None) -> Array:
        """v_theta(x_t, t, context): (B, h, w, C) -> (B, h, w, C) float32."""
        rngs = {"dropout": rng} if (train and rng is not None) else None
        return self.unet.apply({"params": params}, x, t, context, train=train, rngs=rngs)

    # ---------------------------------------------------------------- data
    def lowres_images(self, images: Array) -> Array:
        """High-res images (B, H, W, 3) -> low-res images (B, h, w, 3)."""
        s = self.low_res_size
        return resize(images, (s, s), self.lowres_downsampling, self.lowres_antialias)

    def prepare(self, fs_params: PyTree, batch: Mapping[str, Array], rng: jax.Array
                ) -> tuple[Array, Array, Array | None]:
        """(x0, x1, context) for a batch with `image` and/or precomputed `latent` and
        `latent_lowres` (unscaled; the PSU latent at the high-res latent size)."""
        fs = self.first_stage
        images = batch.get("image")
        # Precomputed latents are stored unscaled, as in the reference.
        scaled = lambda z: (z - fs.shift_factor) * fs.scale_factor
        x1 = scaled(batch["latent"]) if "latent" in batch else fs.encode(fs_params, images)
        lowres = None if images is None else self.lowres_images(images)
        lowres_z = scaled(batch["latent_lowres"]) if "latent_lowres" in batch else None
        image_size = x1.shape[1] * fs.downsample_factor
        x0, context = self.source_and_context(fs_params, lowres, rng, lowres_z=lowres_z,
                                              z_size=x1.shape[1], image_size=image_size)
        x0, x1 = jax.lax.stop_gradient((x0, x1))
        context = None if context is None else jax.lax.stop_gradient(context)
        return x0, x1, context

    def source_and_context(self, fs_params: PyTree, lowres_images: Array | None, rng: jax.Array,
                           lowres_z: Array | None = None, z_size: int | None = None,
                           image_size: int | None = None) -> tuple[Array, Array | None]:
        """x0 and context from low-res images (B, h, w, 3) or a low-res latent."""
        image_size = image_size or self.high_res_size
        z_size = z_size or image_size // self.first_stage.downsample_factor
        if lowres_z is None and self.coupling.upsampling_mode != "psu":
            lowres_z = self.first_stage.encode(fs_params, lowres_images)
        return self.coupling.source_and_context(lowres_z, z_size, lowres_images, image_size,
                                                self.first_stage, fs_params, rng)

    # ---------------------------------------------------------------- loss
    def loss(self, params: PyTree, fs_params: PyTree, batch: Mapping[str, Array],
             rng: jax.Array, train: bool = True) -> Array:
        """The flow-matching loss of a batch, a float32 scalar."""
        prep_rng, loss_rng, drop_rng = jax.random.split(rng, 3)
        x0, x1, context = self.prepare(fs_params, batch, prep_rng)
        v = lambda x, t: self.velocity(params, x, t, context, train=train, rng=drop_rng)
        return flow.flow_matching_loss(v, self.path, x0, x1, loss_rng, self.sigma_min)
