"""`train_and_evaluate(config, workdir)`: the training loop as a library.

Reads top to bottom in sections: config and workdir, mesh, model, optimizer and state,
checkpoint (auto-resume), data, update step, evaluation, loop. Everything a run needs to
continue lives in `workdir`: checkpoints, `metrics.jsonl`, TensorBoard events, sample grids
and, at the end, `eval.json`. The same code runs on one CPU and on a multi-host pod: arrays
are global (`jax.Array`s sharded over `config.mesh`), each process feeds its part of the
batch, and only process 0 writes logs and images.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging
from etils import epath
from PIL import Image
from tqdm.auto import tqdm

from fmboost_jax import checkpointing
from fmboost_jax import config as config_lib
from fmboost_jax import metrics as metrics_lib
from fmboost_jax import sampling
from fmboost_jax import sharding as sharding_lib
from fmboost_jax.cfm import CFM
from fmboost_jax.coupling import resize
from fmboost_jax.data import pipeline as data_pipeline
from fmboost_jax.metric_writer import MetricWriter
from fmboost_jax.models.unet import count_params
from fmboost_jax.preemption import PreemptionWatcher
from fmboost_jax.throughput import flops_of, peak_tflops
from fmboost_jax.train_state import (TrainState, create_train_state, learning_rate_schedule,
                                     make_optimizer, update_ema)

PyTree = Any
restore_params = checkpointing.restore_params  # for notebooks: `trainer.restore_params(workdir)`


# ------------------------------------------------------------------------ update step
def make_train_step(cfm: CFM, tx: optax.GradientTransformation, config: ml_collections.ConfigDict):
    """`train_step(state, fs_params, batch) -> (state, metrics)`, pure and jittable.

    The loss and the optimizer run in float32 whatever `config.dtype` (the UNet's compute dtype)
    is; the first stage's params are an argument and never differentiated.
    """
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


def check_finite(step: int, metrics: dict[str, Any], latest_checkpoint: int | None) -> None:
    """Raises FloatingPointError naming `step` if its loss or gradient norm is NaN or Inf."""
    loss, grad_norm = float(metrics["loss"]), float(metrics["grad_norm"])
    if np.isfinite(loss) and np.isfinite(grad_norm):
        return
    kept = (f"the latest checkpoint (step {latest_checkpoint}) was written before it and is "
            "intact" if latest_checkpoint is not None else "no checkpoint was written")
    raise FloatingPointError(f"Non-finite training step {step}: loss {loss}, gradient norm "
                             f"{grad_norm}. Stopping; {kept}.")


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
    """Samples the held-out set and scores CFM, bilinear and bicubic with PSNR and SSIM.

    The held-out images are split over the mesh's devices in chunks of `eval_batch_size`; the
    per-image scores and the grid images come back replicated to every process.
    """

    def __init__(self, cfm: CFM, config: ml_collections.ConfigDict, images: np.ndarray,
                 mesh: jax.sharding.Mesh):
        size = images.shape[1]
        lowres = size * cfm.low_res_size // cfm.high_res_size
        # The UNet is fully convolutional: evaluate at the crop size of the held-out set.
        self.cfm = dataclasses.replace(cfm, low_res_size=lowres, high_res_size=size)
        self.num_grid = min(config.num_grid_images, images.shape[0])
        self.mesh = mesh
        chunk = config.eval_batch_size or config.batch_size
        self.chunks = [sharding_lib.put_batch(images[i:i + chunk], mesh)
                       for i in range(0, images.shape[0], chunk)]
        self.num_images = images.shape[0]
        self.size = size
        # throw=False: a solver failure is reported by `success` instead of a host callback,
        # which would gather the sharded batch onto one device.
        options = sampling.solver_options(config.sampling)
        sample = functools.partial(sampling.sample, self.cfm, **options, throw=False)
        self.solver = f"{options['solver']} (max_steps {options['max_steps']})"

        def run_chunk(params, fs_params, images, rng):
            lr = self.cfm.lowres_images(images)
            out = sample(params, fs_params, lr, rng)
            preds = {"cfm": jnp.clip(out.images, -1, 1)}
            for m in ("bilinear", "bicubic"):
                preds[m] = jnp.clip(resize(lr, (size, size), m), -1, 1)
            scores = {f"{name}/{metric}": fn(x, images)
                      for name, x in preds.items()
                      for metric, fn in (("psnr", metrics_lib.psnr), ("ssim", metrics_lib.ssim))}
            n = self.num_grid
            grid = jnp.stack([preds["bilinear"][:n], preds["cfm"][:n], images[:n]], axis=1)
            return scores, grid, out.stats["nfe"], out.stats["success"]

        self._run_chunk = jax.jit(run_chunk, out_shardings=sharding_lib.replicated(mesh))

    def run(self, params: PyTree, fs_params: PyTree, rng: jax.Array) -> tuple[dict, np.ndarray]:
        """Metrics {"cfm/psnr", ..., "nfe"} and a grid (bilinear | CFM | ground truth)."""
        sums: dict[str, float] = {}
        grid = None
        nfe = 0
        for i, images in enumerate(self.chunks):
            scores, g, n, ok = jax.device_get(
                self._run_chunk(params, fs_params, images, jax.random.fold_in(rng, i)))
            if not ok:
                raise RuntimeError(f"Evaluation: the ODE solver {self.solver} did not reach t = 1 "
                                   "(raise config.sampling.max_steps or loosen rtol/atol)")
            for k, v in scores.items():
                sums[k] = sums.get(k, 0.0) + float(np.sum(v))
            grid = g if grid is None else grid
            nfe = max(nfe, int(n))
        results = {k: v / self.num_images for k, v in sums.items()}
        results["nfe"] = nfe
        rows = [list(r) for r in np.asarray(grid)[:self.num_grid]]
        return results, image_grid(rows)


# ------------------------------------------------------------------------ main loop
def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
    """Trains (resuming from `workdir` if it holds checkpoints) and returns the final metrics.

    On a preemption notice (SIGTERM) it saves at the next step boundary and returns early with
    `{"preempted": True, "step": ...}`.
    """
    # ---- Config, data and workdir: fail before any work is wasted.
    config_lib.validate(config)
    data_pipeline.check_data(config)
    pid, nproc = jax.process_index(), jax.process_count()
    workpath = epath.Path(workdir)             # a local directory or gs://bucket/...
    if pid == 0:
        workpath.mkdir(parents=True, exist_ok=True)
        (workpath / "config.json").write_text(config.to_json_best_effort(indent=2))
    writer = MetricWriter(workdir)

    # ---- Mesh: devices of all processes; the batch is split over all of them.
    mesh = sharding_lib.make_mesh(config.mesh)
    logging.info("Process %d of %d; mesh %s over %d devices (%s)", pid, nproc,
                 dict(mesh.shape), mesh.size, jax.devices()[0].device_kind)

    # ---- Model: the UNet, the first stage, the coupling and the path.
    cfm = CFM.from_config(config)
    rng = jax.random.PRNGKey(config.seed)
    init_rng, fs_rng, state_rng, eval_rng = jax.random.split(rng, 4)
    fs_params = sharding_lib.put_replicated(cfm.first_stage.init_params(fs_rng), mesh)

    # ---- Optimizer and state, sharded as config.mesh says (FSDP for big arrays).
    tx = make_optimizer(config.optim)

    def init_state(init_rng, state_rng):
        return create_train_state(cfm.init_params(init_rng), tx, state_rng)

    abstract_state = jax.eval_shape(init_state, init_rng, state_rng)
    state_sharding = sharding_lib.state_shardings(abstract_state, mesh, config.fsdp_min_size)
    logging.info("UNet parameters: %s", f"{count_params(abstract_state.params):,}")

    # ---- Checkpoint: auto-resume from the latest complete one.
    mngr = checkpointing.checkpoint_manager(workdir, config.keep_checkpoints, config.keep_every)
    restored = checkpointing.restore(
        mngr, checkpointing.abstract_with_shardings(abstract_state, state_sharding))
    if restored is None:
        state = jax.jit(init_state, out_shardings=state_sharding)(init_rng, state_rng)
        data_state = None
    else:
        state, data_state = restored
    start_step = int(state.step)

    # ---- Data: this process's part of every global batch; the held-out set.
    if data_state is None and start_step > 0:
        logging.warning("The checkpoint holds no input-pipeline state for %d processes: the "
                        "input restarts at step %d (shuffled sources on a new order).", nproc,
                        start_step)
    train_iter = data_pipeline.create_train_iterator(
        config, pid, nproc, start_step=start_step if data_state is None else 0)
    if data_state is not None:
        train_iter.set_state(data_state)
    evaluator = Evaluator(cfm, config, data_pipeline.eval_images(config), mesh)

    # ---- Update step: compiled once for the global batch's shapes and shardings.
    batch_sharding = sharding_lib.batch_sharding(mesh)
    first_batch = sharding_lib.global_batch(next(train_iter), mesh)
    train_step = jax.jit(
        make_train_step(cfm, tx, config),
        in_shardings=(state_sharding, sharding_lib.replicated(mesh), batch_sharding),
        out_shardings=(state_sharding, sharding_lib.replicated(mesh)),
        donate_argnums=(0,),
    ).lower(state, fs_params, first_batch).compile()
    step_flops = flops_of(train_step)          # per device
    peak = peak_tflops(jax.devices()[0].device_kind, config.dtype)

    def evaluate(step: int) -> dict[str, Any]:
        params_s = sampling.sampling_params(state, config.ema.use_for_sampling)
        results, grid = evaluator.run(params_s, fs_params, jax.random.fold_in(eval_rng, step))
        writer.write(step, {f"eval/{k}": v for k, v in results.items()})
        writer.write_image(step, "eval/samples", grid)
        if pid == 0:
            (workpath / "samples").mkdir(parents=True, exist_ok=True)
            with (workpath / "samples" / f"step_{step:07d}.png").open("wb") as f:
                Image.fromarray(grid).save(f, format="PNG")
        logging.info("eval step %d: %s", step, json.dumps(results))
        return results

    # ---- Loop.
    total = config.total_steps
    watcher = PreemptionWatcher()
    bar = tqdm(total=total, initial=start_step, desc="train", unit="step", disable=pid != 0,
               dynamic_ncols=True)
    t_last, steps_since, results = time.perf_counter(), 0, None
    pending = None                  # (step, metrics) not yet checked for NaN/Inf
    last_saved = mngr.latest_step()
    batch, preempted = first_batch, False
    try:
        for step in range(start_step, total):
            if batch is None:
                batch = sharding_lib.global_batch(next(train_iter), mesh)
            state, metrics = train_step(state, fs_params, batch)
            batch = None
            done = step + 1
            # Check the previous step while this one runs: the device never waits on the host.
            if pending is not None:
                check_finite(*pending, last_saved)
            pending = (done, metrics)
            steps_since += 1
            bar.update(1)
            preempted = watcher.reached(done)
            save_now = done % config.checkpoint_every == 0 or done == total or preempted
            log_now = done % config.log_every == 0 or done == total
            if save_now or log_now:
                m = jax.device_get(metrics)
                check_finite(done, m, last_saved)
                pending = None
            if log_now:
                now = time.perf_counter()
                sps = steps_since / (now - t_last)
                t_last, steps_since = now, 0
                m.update(steps_per_sec=sps, images_per_sec=sps * config.batch_size,
                         images_per_sec_per_device=sps * config.batch_size / mesh.size,
                         examples_seen=done * config.batch_size, eta_seconds=(total - done) / sps)
                if step_flops:
                    m["tflops_per_device"] = step_flops * sps / 1e12
                    if peak:
                        m["fraction_of_peak"] = m["tflops_per_device"] / peak
                writer.write(done, m)
                bar.set_postfix(loss=f"{float(m['loss']):.4f}",
                                img_s=f"{m['images_per_sec']:.1f}")
                logging.info(
                    "step %d/%d loss %.5f | %.1f img/s (%.2f per device) | %s%s ETA %s", done,
                    total, float(m["loss"]), m["images_per_sec"], m["images_per_sec_per_device"],
                    f"{m['tflops_per_device']:.3g} TFLOP/s per device " if step_flops else "",
                    f"({100 * m['fraction_of_peak']:.1f}% of peak) |" if "fraction_of_peak" in m
                    else "|", time.strftime("%H:%M:%S", time.gmtime(m["eta_seconds"])))
            if save_now:
                checkpointing.save(mngr, done, state, train_iter)
                last_saved = done
            if preempted:
                logging.warning("Preemption notice: saved step %d; exiting.", done)
                break
            if done % config.eval_every == 0 or done == total:
                results = evaluate(done)
                t_last = time.perf_counter()  # do not count evaluation in the throughput
        if pending is not None:
            check_finite(*pending, last_saved)
    finally:
        bar.close()
        watcher.close()
        if hasattr(train_iter, "close"):
            train_iter.close()       # stops the input pipeline's worker processes
        mngr.wait_until_finished()   # an in-flight save completes, even when a step failed

    if preempted:
        writer.close()
        mngr.close()
        return {"preempted": True, "step": int(state.step)}

    # ---- Final evaluation (also when resuming a finished run).
    if results is None:
        results = evaluate(int(state.step))
    final = {"step": int(state.step), "num_eval_images": evaluator.num_images,
             "eval_size": evaluator.size, "sampler": dict(config.sampling), **results}
    if pid == 0:
        (workpath / "eval.json").write_text(json.dumps(final, indent=2))
    writer.close()
    mngr.close()
    return final
