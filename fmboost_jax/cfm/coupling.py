"""The coupling: the flow's source x0 and its context, made from the up-sampled latent.

Follows the reference trainer (`get_source_and_context`): the source is the up-sampled latent
(or N(0, I) with `start_from_noise`), optionally noised with the forward diffusion at
`noising_step`; the context, concatenated to the UNet input, is the clean up-sampled latent
(made with `upsampling_mode_context` when that differs). Pure: latents in, latents out; how the
up-sampled latents are made from the batch is `upsampling.py`.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax

from fmboost_jax.cfm import noising, upsampling
from fmboost_jax.config import ConfigError, check_one_of

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
    if cp.noising_step >= cp.num_timesteps:
        raise ConfigError("coupling.noising_step",
                          f"must be < coupling.num_timesteps={cp.num_timesteps}")
