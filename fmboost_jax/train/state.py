"""Training state, optimizer and EMA: explicit pytrees, pure update rules.

Optimizer: Adam with (PyTorch-style, L2) weight decay, optional global-norm clipping,
and the reference's schedule: a linear warm-up over `warmup_steps`, then constant. The
reference's LambdaLR gives update n (0-based) the rate `lr * min(1, (n + 1) / warmup_steps)`,
so the first update already moves by lr / warmup_steps; `warmup_from_zero` starts at 0 instead.
EMA: the reference's warm-up rule (lucidrains' ema-pytorch with power 3/4): for update count
`n <= update_after_step` the EMA copies the params; after that
`decay = min(rate, 1 - (1 + e)^-power)` with `e = n - update_after_step`, where `n` is the
0-based step; updates happen on steps divisible by `update_every`. The reference updates the
EMA at the start of each training step, from the params before that step's update
(`ema.before_update`); otherwise it averages the updated params.
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
    """Linear warm-up to lr over `warmup_steps` (update n: lr (n + 1) / warmup, or lr n / warmup
    with `warmup_from_zero`), then constant."""
    if optim.warmup_steps <= 0:
        return optax.constant_schedule(optim.lr)
    if optim.warmup_from_zero:
        return optax.linear_schedule(0.0, optim.lr, optim.warmup_steps)
    return optax.linear_schedule(optim.lr / optim.warmup_steps, optim.lr, optim.warmup_steps - 1)


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
    """The EMA at step `step` (0-based) folding in `params` (those before or after that step's
    update, as `ema.before_update` says; the caller passes them)."""
    every = max(int(ema.update_every), 1)
    decay = jnp.where(step % every == 0, ema_decay(step, ema), 1.0)  # hold between updates
    return jax.tree.map(lambda e, p: decay * e + (1.0 - decay) * p, ema_params, params)


def create_train_state(params: PyTree, tx: optax.GradientTransformation,
                       rng: jax.Array) -> TrainState:
    return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                      ema_params=jax.tree.map(jnp.copy, params),
                      opt_state=tx.init(params), rng=rng)


def check_config(config: Any) -> None:
    """The rules of `config.optim` and `config.ema`."""
    from fmboost_jax.errors import check_range
    check_range(config, "optim.lr", 0)
    check_range(config, "optim.warmup_steps", 0)
    check_range(config, "optim.weight_decay", 0)
    check_range(config, "optim.grad_clip_norm", 0)
    check_range(config, "ema.rate", 0.0, 1.0)
    check_range(config, "ema.update_every", 1)
