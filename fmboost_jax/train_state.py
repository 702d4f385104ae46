"""Training state, optimizer and EMA: explicit pytrees, pure update rules.

Optimizer: Adam with (PyTorch-style, L2) weight decay, optional global-norm clipping,
and the reference's schedule: linear warm-up from 0 to `lr` over `warmup_steps`,
then constant. EMA: the reference's warm-up rule (lucidrains' ema-pytorch with
power 3/4): for update count `n <= update_after_step` the EMA copies the params; after
that `decay = min(rate, 1 - (1 + e)^-power)` with `e = n - update_after_step`,
where `n` is the 0-based step; updates happen on steps divisible by `update_every`.
"""

from __future__ import annotations

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax

PyTree = Any


@flax.struct.dataclass
class TrainState:
    step: jax.Array          # int32 scalar: optimizer updates done
    params: PyTree
    ema_params: PyTree
    opt_state: PyTree
    rng: jax.Array           # key for the next step


def learning_rate_schedule(optim: Any) -> optax.Schedule:
    """Linear warm-up 0 -> lr over `warmup_steps`, then constant."""
    if optim.warmup_steps <= 0:
        return optax.constant_schedule(optim.lr)
    return optax.linear_schedule(0.0, optim.lr, optim.warmup_steps)


def make_optimizer(optim: Any) -> optax.GradientTransformation:
    parts = []
    if optim.grad_clip_norm > 0:
        parts.append(optax.clip_by_global_norm(optim.grad_clip_norm))
    if optim.weight_decay > 0:  # torch.optim.Adam adds wd * param to the gradient
        parts.append(optax.add_decayed_weights(optim.weight_decay))
    parts += [optax.scale_by_adam(b1=optim.b1, b2=optim.b2, eps=optim.eps),
              optax.scale_by_learning_rate(learning_rate_schedule(optim))]
    return optax.chain(*parts)


def ema_decay(step: jax.Array, ema: Any) -> jax.Array:
    """EMA decay at the 0-based training step `step`; 0 means copy the params."""
    e = step.astype(jnp.float32) - ema.update_after_step
    value = 1.0 - (1.0 + jnp.maximum(e, 0.0)) ** (-ema.power)
    return jnp.where(e <= 0, 0.0, jnp.minimum(value, ema.rate))


def update_ema(ema_params: PyTree, params: PyTree, step: jax.Array, ema: Any) -> PyTree:
    """EMA after the optimizer update of step `step` (0-based)."""
    every = max(int(ema.update_every), 1)
    decay = jnp.where(step % every == 0, ema_decay(step, ema), 1.0)  # hold between updates
    return jax.tree.map(lambda e, p: decay * e + (1.0 - decay) * p, ema_params, params)


def create_train_state(params: PyTree, tx: optax.GradientTransformation,
                       rng: jax.Array) -> TrainState:
    return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                      ema_params=jax.tree.map(jnp.copy, params),
                      opt_state=tx.init(params), rng=rng)
