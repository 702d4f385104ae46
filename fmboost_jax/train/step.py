"""The update step: loss, gradients, Adam, EMA, as one pure, jittable function."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from fmboost_jax.cfm.model import CFM
from fmboost_jax.data.images import to_float
from fmboost_jax.train.state import TrainState, learning_rate_schedule, update_ema

PyTree = Any


def make_train_step(cfm: CFM, tx: optax.GradientTransformation, config: ml_collections.ConfigDict):
    """`train_step(state, fs_params, batch) -> (state, metrics)`, pure and jittable; uint8
    images (as the input pipeline sends them) are converted to [-1, 1] on the device.

    The loss and the optimizer run in float32 whatever `config.dtype` (the UNet's compute dtype)
    is; the first stage's params are an argument and never differentiated.
    """
    schedule = learning_rate_schedule(config.optim)
    ema_cfg = config.ema

    def train_step(state: TrainState, fs_params: PyTree, batch: dict[str, jax.Array]):
        if "image" in batch and batch["image"].dtype == jnp.uint8:    # converted on the device
            batch = {**batch, "image": to_float(batch["image"])}
        rng = jax.random.fold_in(state.rng, state.step)
        loss, grads = jax.value_and_grad(cfm.loss)(state.params, fs_params, batch, rng, True)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        averaged = state.params if ema_cfg.before_update else params
        ema_params = update_ema(state.ema_params, averaged, state.step, ema_cfg)
        new_state = state.replace(step=state.step + 1, params=params, ema_params=ema_params,
                                  opt_state=opt_state)
        metrics = {"loss": loss, "grad_norm": optax.tree.norm(grads),
                   "lr": schedule(state.step)}
        return new_state, metrics

    return train_step


def check_finite(step: int, metrics: dict[str, Any], latest_checkpoint: int | None) -> None:
    """Raises FloatingPointError naming `step` if its loss or gradient norm is NaN or Inf."""
    loss, grad_norm = float(metrics["loss"]), float(metrics["grad_norm"])
    if np.isfinite(loss) and np.isfinite(grad_norm):
        return
    kept = (f"the latest checkpoint (step {latest_checkpoint}) was written before it and is "
            "intact" if latest_checkpoint is not None else "no checkpoint was written")
    raise FloatingPointError(f"Non-finite training step {step}: loss {loss}, gradient norm "
                             f"{grad_norm}. Stopping; {kept}.")
