"""Coupling Flow Matching: the pieces of the paper put together for one batch.

`CFM` bundles the UNet, the first stage, the coupling and the flow path. Given a batch it builds
the training pair the reference builds (`extract_from_batch` + `get_source_and_context`):

    x1      = encode(image)                       or batch["latent"] (precomputed)
    lowres  = downsample(image, 1 / upscale)      or batch["latent_lowres"] (a PSU latent)
    z_up    = upsample(lowres)                    (PSU: encode(bilinear_up(lowres)))
    x0, ctx = coupling(z_up)                      (noised at noising_step; clean context,
                                                   zeroed with p = context_dropout)

and regresses v(x_t, t, ctx) onto u_t. Sizes follow the input: the network is fully
convolutional, and the model up-samples by `upscale = high_res_size // low_res_size`. `CFM`
holds no parameters: UNet params and first-stage params are explicit arguments.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from fmboost_jax import config as config_lib
from fmboost_jax.cfm import flow, upsampling
from fmboost_jax.cfm.coupling import Coupling
from fmboost_jax.cfm.upsampling import LowRes
from fmboost_jax.errors import ConfigError, UserError, check_one_of
from fmboost_jax.first_stage import (
    FirstStage,
    downsample_factor,
    first_stage_from_config,
    latent_channels,
)
from fmboost_jax.models.unet import ATTENTION_IMPLEMENTATIONS, EfficientUNet

Array = jax.Array
PyTree = Any
OBJECTIVES = ("cfm", "regression")


class Coupled(NamedTuple):
    """The flow's source x0, its context (None without one), and z_up, the up-sampled latent
    the source was made from (all (B, h, w, C))."""
    x0: Array
    context: Array | None
    z_up: Array


@dataclasses.dataclass(frozen=True)
class CFM:
    unet: EfficientUNet
    first_stage: FirstStage
    coupling: Coupling
    upscale: int                       # high-res size / low-res size
    schedule: str
    sigma_min: float
    lowres_downsampling: str
    lowres_antialias: bool
    objective: str                     # "cfm", or "regression": the paper's baseline

    @classmethod
    def from_config(cls, config: Any) -> CFM:
        unet = EfficientUNet.from_config(config.unet, config_lib.dtype(config.dtype))
        return cls(unet=unet, first_stage=first_stage_from_config(config),
                   coupling=Coupling.from_config(config.coupling),
                   upscale=config.high_res_size // config.low_res_size,
                   schedule=config.flow.schedule, sigma_min=config.flow.sigma_min,
                   lowres_downsampling=config.lowres_downsampling,
                   lowres_antialias=config.lowres_antialias, objective=config.objective)

    @property
    def path(self) -> flow.Path:
        return flow.PATHS[self.schedule]

    @property
    def size_multiple(self) -> int:
        """High-res pixel sizes must be multiples of this (the first stage times the UNet's
        down-sampling)."""
        return self.first_stage.downsample_factor * self.unet.downsampling

    def latent_size(self, image_size: tuple[int, int]) -> tuple[int, int]:
        """(H, W) of high-res pixels -> (h, w) of the flow's latent; raises for sizes the
        network cannot take."""
        m, f = self.size_multiple, self.first_stage.downsample_factor
        if image_size[0] % m or image_size[1] % m:
            raise UserError(f"output size {image_size[0]}x{image_size[1]} px is not a multiple "
                             f"of {m} (the first stage's factor {f} times the UNet's "
                             f"down-sampling {self.unet.downsampling}); choose an input of "
                             f"{m // self.upscale if m % self.upscale == 0 else m}-px multiples")
        return image_size[0] // f, image_size[1] // f

    # ---------------------------------------------------------------- parameters
    def init_params(self, rng: jax.Array, batch_size: int = 1) -> PyTree:
        """UNet params (float32), traced at the smallest latent the UNet takes; one compiled
        program (op by op, the UNet's initialisers take several times as long)."""
        side = self.unet.downsampling
        shape = (batch_size, side, side, self.first_stage.latent_channels)
        return _init_unet(self.unet, rng, shape, self.coupling.uses_context)

    def velocity(self, params: PyTree, x: Array, t: Array, context: Array | None,
                 train: bool = False, rng: jax.Array | None = None) -> Array:
        """v_theta(x_t, t, context): (B, h, w, C) -> (B, h, w, C) float32."""
        rngs = {"dropout": rng} if (train and rng is not None) else None
        return self.unet.apply({"params": params}, x, t, context, train=train, rngs=rngs)

    def guided_velocity(self, params: PyTree, x: Array, t: Array, context: Array | None,
                        guidance_scale: float = 1.0) -> Array:
        """Classifier-free guidance v_u + w (v_c - v_u), v_u the velocity with the zero context
        that `coupling.context_dropout` trains; both halves in one evaluation of a doubled batch
        (B, h, w, C). w = 1 is the conditional velocity itself, evaluated once."""
        if guidance_scale == 1.0:
            return self.velocity(params, x, t, context)
        if context is None:
            raise UserError("guidance needs a model with a context (coupling.concat_context)")
        t = jnp.broadcast_to(jnp.asarray(t, jnp.float32), (x.shape[0],))
        both = self.velocity(params, jnp.concatenate([x, x]), jnp.concatenate([t, t]),
                             jnp.concatenate([jnp.zeros_like(context), context]))
        v_uncond, v_cond = jnp.split(both, 2)
        return v_uncond + guidance_scale * (v_cond - v_uncond)

    # ---------------------------------------------------------------- the coupling
    def lowres_images(self, images: Array) -> Array:
        """High-res images (B, H, W, 3) -> low-res images (B, H/upscale, W/upscale, 3)."""
        h, w = images.shape[1] // self.upscale, images.shape[2] // self.upscale
        return upsampling.resize(images, (h, w), self.lowres_downsampling, self.lowres_antialias)

    def couple(self, fs_params: PyTree, lowres: LowRes, size: tuple[int, int], rng: jax.Array
               ) -> Coupled:
        """x0 (B, *size, C), the context (or None) and the source's up-sampled latent z_up from
        the low-res input."""
        up_rng, ctx_rng, rng = jax.random.split(rng, 3)
        zs = [upsampling.upsample(mode, lowres, size, self.first_stage, fs_params, r)
              for mode, r in zip(self.coupling.context_modes, (up_rng, ctx_rng))]
        x0, context = self.coupling(zs[0], zs[1] if len(zs) > 1 else None, rng)
        return Coupled(x0, context, zs[0])

    def prepare(self, fs_params: PyTree, batch: Mapping[str, Array], rng: jax.Array
                ) -> tuple[Array, Array, Array | None]:
        """(x0, x1, context) for a batch with `image` and/or precomputed `latent` and
        `latent_lowres` (unscaled, as stored; the PSU latent at the high-res latent size)."""
        fs = self.first_stage
        images = batch.get("image")
        scaled = lambda z: (z - fs.shift_factor) * fs.scale_factor
        x1 = scaled(batch["latent"]) if "latent" in batch else fs.encode(fs_params, images)
        lowres = LowRes(images=None if images is None else self.lowres_images(images),
                        psu_latent=scaled(batch["latent_lowres"]) if "latent_lowres" in batch
                        else None)
        x0, context, _ = self.couple(fs_params, lowres, x1.shape[1:3], rng)
        return jax.lax.stop_gradient((x0, x1, context))

    # ---------------------------------------------------------------- loss
    def loss(self, params: PyTree, fs_params: PyTree, batch: Mapping[str, Array],
             rng: jax.Array, train: bool = True) -> Array:
        """The flow-matching loss of a batch, a float32 scalar."""
        # One key per use: the coupling's noise, t (and eps), dropout, the context-dropout mask.
        prep_rng, loss_rng, drop_rng, mask_rng = jax.random.split(rng, 4)
        x0, x1, context = self.prepare(fs_params, batch, prep_rng)
        if train and self.coupling.context_dropout > 0:
            context = self.coupling.drop_context(context, mask_rng)
        if self.objective == "regression":
            x1_hat = self.regress(params, x0, context, train=train, rng=drop_rng)
            return jnp.mean(jnp.square(x1_hat.astype(jnp.float32) - x1.astype(jnp.float32)))
        v = lambda x, t: self.velocity(params, x, t, context, train=train, rng=drop_rng)
        return flow.flow_matching_loss(v, self.path, x0, x1, loss_rng, self.sigma_min)

    def regress(self, params: PyTree, x0: Array, context: Array | None, train: bool = False,
                rng: jax.Array | None = None) -> Array:
        """The regression baseline's prediction of x1 in one pass (B, h, w, C): the same UNet at
        t = 0 on the clean up-sampled latent x0, as a residual x0 + f(x0, context), so that an
        untrained (zero) output is the up-sampled latent itself."""
        t = jnp.zeros((x0.shape[0],), jnp.float32)
        return x0 + self.velocity(params, x0, t, context, train=train, rng=rng)


def check_config(config: Any) -> None:
    """Sizes, and the UNet against the first stage and the coupling."""
    lo, hi = config.low_res_size, config.high_res_size
    if lo <= 0 or hi <= 0:
        raise ConfigError("low_res_size", f"sizes must be positive (low {lo}, high {hi})")
    if hi % lo:
        raise ConfigError("low_res_size", f"{lo} does not divide high_res_size {hi}")
    check_one_of(config, "dtype", config_lib.DTYPE_NAMES)
    check_one_of(config, "lowres_downsampling", ("bilinear", "bicubic"))
    check_one_of(config, "unet.attention", ATTENTION_IMPLEMENTATIONS)
    from fmboost_jax.cfm import coupling
    coupling.check_config(config)
    cp = config.coupling
    for field in ("upsampling_mode", "upsampling_mode_context"):
        if cp[field] == "identity" and lo != hi:
            raise ConfigError(f"coupling.{field}", "'identity' takes the low-res latent as the "
                              f"up-sampled one: it needs low_res_size ({lo}) == high_res_size "
                              f"({hi})")
    flow.check_config(config)
    check_one_of(config, "objective", OBJECTIVES)
    if config.objective == "regression":
        for field, bad in (("start_from_noise", cp.start_from_noise),
                           ("noising_step", cp.noising_step > 0)):
            if bad:
                raise ConfigError(f"coupling.{field}", "a regression model's input is the clean "
                                  "up-sampled latent: set coupling.noising_step=-1 and "
                                  "coupling.start_from_noise=False")
    u, channels = config.unet, latent_channels(config)
    uses_context = config.coupling.concat_context or config.coupling.start_from_noise
    want_in = channels * (2 if uses_context else 1)
    if u.in_channels != want_in:
        raise ConfigError("unet.in_channels", f"is {u.in_channels}, but the first stage gives "
                          f"{channels} channels{' plus as many of context' if uses_context else ''}"
                          f" = {want_in}")
    if u.out_channels != channels:
        raise ConfigError("unet.out_channels", f"is {u.out_channels}, but the first stage has "
                          f"{channels} channels")
    for m in u.channel_mult:
        if (m * u.model_channels) % 32:
            raise ConfigError("unet.model_channels", f"{u.model_channels} x channel_mult {m} is "
                              "not a multiple of 32 (GroupNorm uses 32 groups)")
    down = 2 ** (len(u.channel_mult) - 1) * max(u.pool_factor, 1)
    latent = hi // downsample_factor(config)
    if latent % down:
        raise ConfigError("unet.channel_mult", f"the latent size {latent} is not divisible by the "
                          f"UNet's total down-sampling {down}")


@functools.partial(jax.jit, static_argnums=(0, 2, 3))
def _init_unet(unet: EfficientUNet, rng: jax.Array, shape: tuple[int, ...], context: bool) -> PyTree:
    z = jnp.zeros(shape, jnp.float32)
    return unet.init(rng, z, jnp.zeros(shape[:1]), z if context else None)["params"]
