"""`train_and_evaluate(config, workdir)`: the training loop as a library.

Set-up (`setup.py`: checks, mesh, model, state, restore, data, compile) is apart from the loop
below. Everything a run needs to continue lives in `workdir`: checkpoints, `metrics.jsonl`,
TensorBoard events, sample grids and, at the end, `eval.json`. The same code runs on one CPU
and on a multi-host pod: arrays are global (`jax.Array`s sharded over `config.mesh`), each
process feeds its part of the batch, and only process 0 writes logs and images.
"""

from __future__ import annotations

import contextlib
import json
from typing import Any

import jax
import ml_collections
from absl import logging
from PIL import Image
from tqdm.auto import tqdm

from fmboost_jax import paths
from fmboost_jax.cfm import sampling
from fmboost_jax.checkpoints import store
from fmboost_jax.parallel import sharding as sharding_lib
from fmboost_jax.train.metric_writer import MetricWriter
from fmboost_jax.train.preemption import PreemptionWatcher
from fmboost_jax.train.setup import Run, build_run, startup_checks, validate
from fmboost_jax.train.step import check_finite

restore_params = store.restore_params  # for notebooks: `loop.restore_params(workdir)`


def due(step: int, every: int, total: int) -> bool:
    """Whether a periodic action (log, save, evaluate) runs after `step` steps: every `every`
    steps and at the last one."""
    return step % every == 0 or step == total


def evaluate(run: Run, writer: MetricWriter, workdir: str, step: int) -> dict[str, Any]:
    """Scores the held-out set at `step`; logs the figures and writes the sample grid."""
    params = sampling.sampling_params(run.state, run.config.ema.use_for_sampling)
    results, grid = run.evaluator.run(params, run.fs_params, jax.random.fold_in(run.eval_rng, step))
    writer.write(step, {f"eval/{k}": v for k, v in results.items()})
    writer.write_image(step, "eval/samples", grid)
    if jax.process_index() == 0:
        with paths.atomic_write(paths.join(workdir, "samples", f"step_{step:07d}.png")) as f:
            Image.fromarray(grid).save(f, format="PNG")
    logging.info("eval step %d: %s", step, json.dumps(results))
    return results


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
    """Trains (resuming from `workdir` if it holds checkpoints) and returns the final metrics.

    On a preemption notice (SIGTERM) it saves at the next step boundary and returns early with
    `{"preempted": True, "step": ...}`.
    """
    validate(config)                   # fail before any work is wasted or a file written
    startup_checks(config)
    run = build_run(config, workdir)   # refuses a checkpoint of another state, touching nothing
    if jax.process_index() == 0:       # the config of the state it restored or started
        paths.write_text(paths.join(workdir, store.CONFIG_FILE), config.to_json_best_effort(indent=2))
    writer = MetricWriter(workdir, config)
    c, total, start = config, config.total_steps, int(run.state.step)
    watcher = PreemptionWatcher()
    bar = tqdm(total=total, initial=start, desc="train", unit="step",
               disable=jax.process_index() != 0, dynamic_ncols=True)
    results, preempted, completed = None, False, False
    pending = None                     # (step, metrics) not yet checked for NaN/Inf
    last_saved = run.checkpoints.latest_step()
    batch = run.first_batch
    try:
        for step in range(start + 1, total + 1):
            run.state, metrics = run.train_step(run.state, run.fs_params, batch)
            # Check the previous step while this one runs: the device never waits on the host.
            if pending is not None:
                check_finite(*pending, last_saved)
            pending = (step, metrics)
            store.check(run.checkpoints)   # a failed background save stops the run now
            run.meter.tick()
            bar.update(1)
            preempted = watcher.reached(step)
            save_now, log_now = due(step, c.checkpoint_every, total) or preempted, \
                due(step, c.log_every, total)
            if save_now or log_now:
                metrics = jax.device_get(metrics)
                check_finite(step, metrics, last_saved)
                pending = None
            if log_now:
                metrics.update(run.meter.read(step))
                writer.write(step, metrics)
                bar.set_postfix(loss=f"{float(metrics['loss']):.4f}",
                                img_s=f"{metrics['images_per_sec']:.1f}")
                logging.info(run.meter.line(step, metrics))
            if save_now:
                store.save(run.checkpoints, step, run.state, run.train_iter)
                last_saved = step
            if preempted:
                logging.warning("Preemption notice: saved step %d; exiting.", step)
                break
            if due(step, c.eval_every, total):
                results = evaluate(run, writer, workdir, step)
                run.meter.reset_clock()        # evaluation does not count in the throughput
            if step < total:
                batch = sharding_lib.global_batch(next(run.train_iter), run.mesh)
        if pending is not None:
            check_finite(*pending, last_saved)
        completed = True
    finally:
        if not completed:                      # a failing run: what was logged is kept
            with contextlib.suppress(Exception):
                writer.close()
        bar.close()
        watcher.close()
        run.train_iter.close()                 # stops the input pipeline's worker processes
        # An in-flight save completes, even on failure; its own error then yields to the first.
        store.wait(run.checkpoints, raise_error=completed)
    final = {"preempted": True, "step": int(run.state.step)} if preempted else \
        finish(run, writer, workdir, results)
    writer.close()
    run.checkpoints.close()
    return final


def finish(run: Run, writer: MetricWriter, workdir: str, results: dict | None) -> dict[str, Any]:
    """The final evaluation (also when resuming a finished run), written to `eval.json`."""
    step = int(run.state.step)
    if results is None:
        results = evaluate(run, writer, workdir, step)
    final = {"step": step, "num_eval_images": run.evaluator.num_images,
             "eval_size": run.evaluator.size, "sampler": dict(run.config.sampling), **results}
    if jax.process_index() == 0:
        paths.write_text(paths.join(workdir, "eval.json"), json.dumps(final, indent=2))
    return final
