"""`train_and_evaluate(config, workdir)`: the training loop as a library.

Reads top to bottom in sections: config and workdir, model, optimizer and state,
checkpoint (auto-resume), data, update step, evaluation, loop. Everything a run
needs to continue lives in `workdir`: checkpoints, `metrics.jsonl`, TensorBoard
events, sample grids and, at the end, `eval.json`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp
from absl import logging
from PIL import Image
from tqdm.auto import tqdm

from fmboost_jax import config as config_lib
from fmboost_jax import metrics as metrics_lib
from fmboost_jax import sampling
from fmboost_jax.cfm import CFM
from fmboost_jax.coupling import resize
from fmboost_jax.data import photos
from fmboost_jax.metric_writer import MetricWriter
from fmboost_jax.models.unet import count_params
from fmboost_jax.train_state import (TrainState, create_train_state, learning_rate_schedule,
                                     make_optimizer, update_ema)

PyTree = Any


# ------------------------------------------------------------------------ update step
def make_train_step(cfm: CFM, tx: optax.GradientTransformation, config: ml_collections.ConfigDict):
    """`train_step(state, fs_params, batch) -> (state, metrics)`, pure and jittable."""
    schedule = learning_rate_schedule(config.optim)
    ema_cfg = config.ema

    def train_step(state: TrainState, fs_params: PyTree, batch: dict[str, jax.Array]):
        rng = jax.random.fold_in(state.rng, state.step)
        loss, grads = jax.value_and_grad(cfm.loss)(state.params, fs_params, batch, rng, True)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        ema_params = update_ema(state.ema_params, params, state.step, ema_cfg)
        new_state = state.replace(step=state.step + 1, params=params, ema_params=ema_params,
                                  opt_state=opt_state)
        metrics = {"loss": loss, "grad_norm": optax.tree.norm(grads),
                   "lr": schedule(state.step)}
        return new_state, metrics

    return train_step


# ------------------------------------------------------------------------ evaluation
def image_grid(rows: list[list[np.ndarray]], min_tile: int = 128) -> np.ndarray:
    """Tiles images in [-1, 1] (each (H, W, 3)) into one uint8 grid, enlarged (nearest) to
    at least `min_tile` pixels per tile."""
    h = rows[0][0].shape[0]
    k = max(1, -(-min_tile // h))
    grid = np.concatenate([np.concatenate(r, axis=1) for r in rows], axis=0)
    grid = np.repeat(np.repeat(grid, k, axis=0), k, axis=1)
    return np.clip(np.round((grid + 1.0) * 127.5), 0, 255).astype(np.uint8)


class Evaluator:
    """Samples the held-out set and scores CFM, bilinear and bicubic with PSNR and SSIM."""

    def __init__(self, cfm: CFM, config: ml_collections.ConfigDict, images: np.ndarray):
        size = images.shape[1]
        lowres = size * cfm.low_res_size // cfm.high_res_size
        # The UNet is fully convolutional: evaluate at the crop size of the held-out set.
        self.cfm = dataclasses.replace(cfm, low_res_size=lowres, high_res_size=size)
        self.config = config
        self.images = jnp.asarray(images)
        self.sample_fn = sampling.sample_fn_from_config(self.cfm, config.sampling)

        @jax.jit
        def baselines(hr):
            lr = self.cfm.lowres_images(hr)
            up = {m: jnp.clip(resize(lr, (size, size), m), -1, 1) for m in ("bilinear", "bicubic")}
            return lr, up

        self.lowres, self.upsampled = baselines(self.images)

    def run(self, params: PyTree, fs_params: PyTree, rng: jax.Array) -> tuple[dict, np.ndarray]:
        """Metrics {"cfm/psnr", ..., "nfe"} and a grid (bilinear | CFM | ground truth)."""
        out = self.sample_fn(params, fs_params, self.lowres, rng)
        pred = jnp.clip(out.images, -1, 1)
        results = {}
        for name, x in (("cfm", pred), *self.upsampled.items()):
            results[f"{name}/psnr"] = float(metrics_lib.psnr(x, self.images).mean())
            results[f"{name}/ssim"] = float(metrics_lib.ssim(x, self.images).mean())
        results["nfe"] = int(out.stats["nfe"])
        n = min(self.config.num_grid_images, self.images.shape[0])
        rows = [[np.asarray(self.upsampled["bilinear"][i]), np.asarray(pred[i]),
                 np.asarray(self.images[i])] for i in range(n)]
        return results, image_grid(rows)


# ------------------------------------------------------------------------ checkpoints
def checkpoint_manager(workdir: str, config: ml_collections.ConfigDict) -> ocp.CheckpointManager:
    options = ocp.CheckpointManagerOptions(max_to_keep=config.keep_checkpoints,
                                           enable_async_checkpointing=True, create=True)
    return ocp.CheckpointManager(os.path.abspath(os.path.join(workdir, "checkpoints")),
                                 options=options)


def restore_or_init(mngr: ocp.CheckpointManager, state: TrainState) -> TrainState:
    """The latest checkpoint restored onto `state`'s structure, or `state` itself."""
    latest = mngr.latest_step()
    if latest is None:
        return state
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, state)
    logging.info("Resuming from checkpoint at step %d", latest)
    return mngr.restore(latest, args=ocp.args.StandardRestore(abstract))


def restore_params(workdir: str, use_ema: bool = True, step: int | None = None) -> PyTree:
    """UNet params (EMA copy by default) of the latest (or given) checkpoint in `workdir`."""
    path = os.path.abspath(os.path.join(workdir, "checkpoints"))
    mngr = ocp.CheckpointManager(path)
    step = mngr.latest_step() if step is None else step
    if step is None:
        raise FileNotFoundError(f"No checkpoint in {path}")
    state = mngr.restore(step, args=ocp.args.StandardRestore())
    mngr.close()
    return state["ema_params" if use_ema else "params"]


# ------------------------------------------------------------------------ main loop
def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
    """Trains (resuming from `workdir` if it holds checkpoints) and returns the final metrics."""
    # ---- Config and workdir: fail before any work is wasted.
    config_lib.validate(config)
    os.makedirs(workdir, exist_ok=True)
    if jax.process_index() == 0:
        with open(os.path.join(workdir, "config.json"), "w") as f:
            f.write(config.to_json_best_effort(indent=2))
    writer = MetricWriter(workdir)

    # ---- Model: the UNet, the first stage, the coupling and the path.
    cfm = CFM.from_config(config)
    rng = jax.random.PRNGKey(config.seed)
    init_rng, fs_rng, state_rng, eval_rng = jax.random.split(rng, 4)
    fs_params = cfm.first_stage.init_params(fs_rng)
    params = jax.jit(cfm.init_params)(init_rng)
    logging.info("UNet parameters: %s", f"{count_params(params):,}")

    # ---- Optimizer and state; auto-resume.
    tx = make_optimizer(config.optim)
    state = create_train_state(params, tx, state_rng)
    mngr = checkpoint_manager(workdir, config)
    state = restore_or_init(mngr, state)
    start_step = int(state.step)

    # ---- Data.
    d = config.data
    train_data = photos.PhotoCrops(tuple(d.train_photos), config.high_res_size,
                                   config.batch_size, config.seed)
    eval_size = d.eval_crop_size or config.high_res_size
    evaluator = Evaluator(cfm, config, photos.eval_crops(tuple(d.eval_photos), eval_size,
                                                         d.num_eval_images))

    # ---- Update step.
    train_step = jax.jit(make_train_step(cfm, tx, config), donate_argnums=(0,))

    def evaluate(step: int) -> dict[str, Any]:
        params_s = sampling.sampling_params(state, config.ema.use_for_sampling)
        results, grid = evaluator.run(params_s, fs_params, jax.random.fold_in(eval_rng, step))
        writer.write(step, {f"eval/{k}": v for k, v in results.items()})
        writer.write_image(step, "eval/samples", grid)
        if jax.process_index() == 0:
            os.makedirs(os.path.join(workdir, "samples"), exist_ok=True)
            Image.fromarray(grid).save(os.path.join(workdir, "samples", f"step_{step:07d}.png"))
        logging.info("eval step %d: %s", step, json.dumps(results))
        return results

    # ---- Loop.
    total = config.total_steps
    bar = tqdm(total=total, initial=start_step, desc="train", unit="step",
               disable=jax.process_index() != 0, dynamic_ncols=True)
    t_last, steps_since, results = time.perf_counter(), 0, None
    for step in range(start_step, total):
        batch = jax.tree.map(jnp.asarray, train_data.batch(step))
        state, metrics = train_step(state, fs_params, batch)
        steps_since += 1
        done = step + 1
        bar.update(1)
        if done % config.log_every == 0 or done == total:
            m = jax.device_get(metrics)
            if not np.isfinite(m["loss"]):
                raise FloatingPointError(f"Loss is {m['loss']} at step {done}; stopping. The last "
                                         "checkpoint is intact.")
            now = time.perf_counter()
            sps = steps_since / (now - t_last)
            t_last, steps_since = now, 0
            m.update(steps_per_sec=sps, images_per_sec=sps * config.batch_size,
                     examples_seen=done * config.batch_size, eta_seconds=(total - done) / sps)
            writer.write(done, m)
            bar.set_postfix(loss=f"{float(m['loss']):.4f}", img_s=f"{sps * config.batch_size:.1f}")
        if done % config.checkpoint_every == 0 or done == total:
            mngr.save(done, args=ocp.args.StandardSave(state))
        if done % config.eval_every == 0 or done == total:
            results = evaluate(done)
            t_last = time.perf_counter()  # do not count evaluation in the throughput
    bar.close()
    mngr.wait_until_finished()

    # ---- Final evaluation (also when resuming a finished run).
    if results is None:
        results = evaluate(int(state.step))
    final = {"step": int(state.step), "num_eval_images": int(evaluator.images.shape[0]),
             "eval_size": int(evaluator.images.shape[1]),
             "sampler": dict(config.sampling), **results}
    if jax.process_index() == 0:
        with open(os.path.join(workdir, "eval.json"), "w") as f:
            json.dump(final, f, indent=2)
    writer.close()
    mngr.close()
    return final
