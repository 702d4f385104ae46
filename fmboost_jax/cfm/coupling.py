"""The coupling: the flow's source x0 and its context, made from the up-sampled latent.

Follows the reference trainer (`get_source_and_context`): the source is the up-sampled latent
(or N(0, I) with `start_from_noise`), optionally noised with the forward diffusion at
`noising_step`; the context, concatenated to the UNet input, is the clean up-sampled latent
(made with `upsampling_mode_context` when that differs). Pure: latents in, latents out; how the
up-sampled latents are made from the batch is `upsampling.py`.

Given the context the source is Gaussian, x0 ~ N(source_mean(z_up), source_std^2 I): the SDE
samplers' score needs both (`sde.score_from_velocity`). For classifier-free guidance, training
replaces the context by zeros with probability `context_dropout` (`drop_context`): zeros rather
than a learned null context, because they add no parameters (checkpoints keep the reference's
layout) and fit any latent size of the fully convolutional network; the scaled latents are
roughly zero-mean, so zeros carry no image.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp

from fmboost_jax.cfm import noising, upsampling
from fmboost_jax.errors import ConfigError, check_one_of

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class Coupling:
    """The coupling's settings; field names and defaults are `config.coupling`'s."""
    upsampling_mode: str
    upsampling_mode_context: str       # resolved: never empty
    start_from_noise: bool
    noising_step: int                  # <= 0 disables the forward noising
    concat_context: bool
    num_timesteps: int
    context_dropout: float             # probability of training on a zero context

    @classmethod
    def from_config(cls, coupling: Any) -> Coupling:
        fields = {f.name: coupling[f.name] for f in dataclasses.fields(cls)}
        fields["upsampling_mode_context"] = fields["upsampling_mode_context"] or \
            fields["upsampling_mode"]
        return cls(**fields)

    @property
    def uses_context(self) -> bool:
        return self.concat_context or self.start_from_noise

    @property
    def context_modes(self) -> tuple[str, ...]:
        """The up-sampling modes whose latents `__call__` needs: (source[, context])."""
        if self.uses_context and self.upsampling_mode_context != self.upsampling_mode:
            return (self.upsampling_mode, self.upsampling_mode_context)
        return (self.upsampling_mode,)

    @property
    def _alpha_bar(self) -> float:
        """alpha-bar of the source's noising step (1 without noising)."""
        if self.noising_step <= 0:
            return 1.0
        return noising.alpha_bar_at(self.noising_step, self.num_timesteps)

    @property
    def source_std(self) -> float:
        """Standard deviation of x0 given the context: 1 for noise, sqrt(1 - alpha_bar) when
        noised, 0 for the bare up-sampled latent."""
        return 1.0 if self.start_from_noise else math.sqrt(1.0 - self._alpha_bar)

    def source_mean(self, z_up: Array) -> Array:
        """Mean of x0 given the context (B, h, w, C): sqrt(alpha_bar) z_up (0 for noise)."""
        if self.start_from_noise:
            return jnp.zeros_like(z_up)
        return math.sqrt(self._alpha_bar) * z_up

    def drop_context(self, context: Array, rng: jax.Array) -> Array:
        """Training's context dropout: each sample's context (B, h, w, C) is zeroed with
        probability `context_dropout`."""
        keep = jax.random.bernoulli(rng, 1.0 - self.context_dropout, (context.shape[0],))
        return context * keep.reshape((-1,) + (1,) * (context.ndim - 1)).astype(context.dtype)

    def __call__(self, z_up: Array, z_context: Array | None, rng: jax.Array
                 ) -> tuple[Array, Array | None]:
        """(x0, context or None) from the up-sampled latent (B, h, w, C) of the source's mode and,
        when the context uses another mode, that mode's latent (else None: z_up is used)."""
        noise_rng, src_rng = jax.random.split(rng)
        x0 = jax.random.normal(src_rng, z_up.shape, z_up.dtype) if self.start_from_noise else z_up
        if self.noising_step > 0:
            noise = jax.random.normal(noise_rng, z_up.shape, z_up.dtype)
            x0 = noising.q_sample(x0, self.noising_step, noise, self.num_timesteps)
        if not self.uses_context:
            return x0, None
        return x0, z_up if z_context is None else z_context


def check_config(config: Any) -> None:
    """The rules of `config.coupling`."""
    cp = config.coupling
    check_one_of(config, "coupling.upsampling_mode", upsampling.MODES)
    if cp.upsampling_mode_context:
        check_one_of(config, "coupling.upsampling_mode_context", upsampling.MODES)
    if cp.start_from_noise and cp.noising_step > 0:
        raise ConfigError("coupling.noising_step", "must be <= 0 when coupling.start_from_noise "
                          "is set (the source is already pure noise)")
    if not 0.0 <= cp.context_dropout < 1.0:
        raise ConfigError("coupling.context_dropout", f"must be in [0, 1), got {cp.context_dropout}")
    if cp.context_dropout > 0 and not (cp.concat_context or cp.start_from_noise):
        raise ConfigError("coupling.context_dropout", "drops the concatenated context: it needs "
                          "coupling.concat_context=True")
    if cp.noising_step >= cp.num_timesteps:
        raise ConfigError("coupling.noising_step",
                          f"must be < coupling.num_timesteps={cp.num_timesteps}")
