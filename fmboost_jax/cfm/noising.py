"""Forward diffusion noising of the coupling source ("noising step 400").

The reference perturbs the up-sampled low-res latent with the forward process of
a diffusion model before flowing from it. Its schedule is the shifted cosine of
Hoogeboom et al.: `alpha_bar(tau) = sigmoid(-2 log(tan(pi tau / 2) + 1e-5) + 2 log(64 / im_size))`
on `tau = linspace(0, 1, num_timesteps)`, with `im_size = 64` (shift 0) in the trainer.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from fmboost_jax.config import NUM_TIMESTEPS

Array = jax.Array
IM_SIZE = 64              # the reference trainer's `im_size`: no shift of the schedule


def shifted_cosine_alpha_bar(num_timesteps: int = NUM_TIMESTEPS, im_size: int = IM_SIZE,
                             ref_size: int = IM_SIZE) -> np.ndarray:
    """alpha_bar for every discrete step, (num_timesteps,) float32."""
    tau = np.linspace(0.0, 1.0, num_timesteps)
    log_snr = -2.0 * np.log(np.tan(np.pi * tau / 2.0) + 1e-5) + 2.0 * np.log(ref_size / im_size)
    return (1.0 / (1.0 + np.exp(-log_snr))).astype(np.float32)


def alpha_bar_at(step: int, num_timesteps: int = NUM_TIMESTEPS, im_size: int = IM_SIZE) -> float:
    """alpha_bar at one discrete step, e.g. `alpha_bar_at(400) = 0.65390`."""
    if not 0 <= step < num_timesteps:
        raise ValueError(f"noising_step must lie in [0, {num_timesteps}), got {step}")
    return float(shifted_cosine_alpha_bar(num_timesteps, im_size)[step])


def q_sample(x: Array, step: int, noise: Array, num_timesteps: int = NUM_TIMESTEPS,
             im_size: int = IM_SIZE) -> Array:
    """Samples q(x_step | x) = sqrt(alpha_bar) x + sqrt(1 - alpha_bar) noise, any shape."""
    a = alpha_bar_at(step, num_timesteps, im_size)
    return jnp.sqrt(a) * x + jnp.sqrt(1.0 - a) * noise.astype(x.dtype)
