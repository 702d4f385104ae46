"""Everything a training run needs before its first step, built from the config.

`validate(config)` checks every field of a training config (each component's `check_config`);
`startup_checks(config)` runs the checks of files, devices and data together, before anything is
written; `build_run(config, workdir)` makes the mesh, the model, the sharded state (restored from
the latest checkpoint when there is one), the input pipeline, the evaluator and the compiled
update step, and returns them as one `Run`.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax
from absl import logging

from fmboost_jax import config as config_lib
from fmboost_jax import first_stage, paths
from fmboost_jax.cfm import model as cfm_model
from fmboost_jax.cfm import sampling
from fmboost_jax.cfm.model import CFM
from fmboost_jax.checkpoints import store
from fmboost_jax.data import pipeline as data_pipeline
from fmboost_jax.errors import UserError, check_range
from fmboost_jax.evaluation import benchmark
from fmboost_jax.evaluation.evaluator import Evaluator
from fmboost_jax.models.layers import count_params
from fmboost_jax.parallel import sharding as sharding_lib
from fmboost_jax.train import state as state_lib
from fmboost_jax.train import wandb_logging
from fmboost_jax.train.meter import Meter, flops_of, peak_tflops
from fmboost_jax.train.state import TrainState, create_train_state, make_optimizer
from fmboost_jax.train.step import make_train_step

PyTree = Any


def check_config(config: ml_collections.ConfigDict) -> None:
    """The rules of the run's own fields (steps, periods, checkpoints, batch)."""
    for field in ("batch_size", "total_steps", "log_every", "eval_every", "checkpoint_every",
                  "keep_checkpoints", "fsdp_min_size", "num_grid_images"):
        check_range(config, field, 1)
    for field in ("keep_every", "eval_batch_size"):
        check_range(config, field, 0)
    state_lib.check_config(config)
    benchmark.check_config(config)


def validate(config: ml_collections.ConfigDict) -> None:
    """Every rule of a training config, component by component: ConfigError naming the first
    offending field; pure (no files, no devices)."""
    config_lib.check_fields(config)
    for check in (first_stage.check_config, cfm_model.check_config, sampling.check_config,
                  data_pipeline.check_config, sharding_lib.check_config, check_config,
                  wandb_logging.check_config):
        check(config)


def check_resources(config: ml_collections.ConfigDict, num_devices: int | None = None) -> None:
    """The config against this machine: the VAE checkpoint exists, the mesh fits the devices
    (or `num_devices`) and the batch splits over them. Raises ConfigError naming the field."""
    first_stage.check_checkpoint(config)
    sharding_lib.check_devices(config, num_devices)


def startup_checks(config: ml_collections.ConfigDict, num_devices: int | None = None) -> None:
    """Files, devices (this run's, or `num_devices`), data and the evaluation's Inception weights,
    checked together before any work is done."""
    wandb_logging.check_installed(config)
    check_resources(config, num_devices)
    data_pipeline.check_data(config)
    benchmark.check_resources(config)


@dataclasses.dataclass
class Run:
    """The parts of a training run; `state` and `train_iter` change as it goes."""
    config: ml_collections.ConfigDict
    mesh: jax.sharding.Mesh
    cfm: CFM
    fs_params: PyTree
    state: TrainState
    train_iter: Any
    first_batch: dict[str, jax.Array]
    train_step: Any                    # compiled (state, fs_params, batch) -> (state, metrics)
    evaluator: Evaluator
    checkpoints: Any                   # orbax CheckpointManager
    meter: Meter
    eval_rng: jax.Array


def _state(config: ml_collections.ConfigDict, cfm: CFM, tx: optax.GradientTransformation,
           mesh: jax.sharding.Mesh, mngr: Any, workdir: str, rngs: tuple[jax.Array, jax.Array]):
    """The sharded state (restored when the workdir has a checkpoint, else new or started from
    `config.init_from`) and the data state; UserError, before any file is touched, when the
    checkpoint holds a state of another shape than the config builds."""
    init = lambda a, b: create_train_state(cfm.init_params(a), tx, b)
    abstract = jax.eval_shape(init, *rngs)
    shardings = sharding_lib.state_shardings(abstract, mesh, config.fsdp_min_size)
    logging.info("UNet parameters: %s", f"{count_params(abstract.params):,}")
    check_resumable(config, mngr, workdir, abstract)
    restored = store.restore(mngr, store.abstract_with_shardings(abstract, shardings))
    if restored is not None:
        if config.init_from:
            logging.info("config.init_from=%s is not used: the run resumes from its own "
                         "checkpoint", config.init_from)
        return (*restored, shardings)
    state = jax.jit(init, out_shardings=shardings)(*rngs)
    if config.init_from:
        state = load_weights(state, config.init_from, shardings)
    return state, None, shardings


def check_resumable(config: ml_collections.ConfigDict, mngr: Any, workdir: str,
                    abstract: Any) -> None:
    """UserError naming the config fields that changed when the latest checkpoint's state does
    not have the shapes `config` builds (another network or optimizer): the run's files are
    left as they are. A checkpoint whose metadata cannot be read is left to `store.restore`."""
    step = mngr.latest_step()
    if step is None:
        return
    try:
        differences = store.state_differences(mngr, step, abstract)
    except Exception:           # damaged metadata: the restore judges (and moves) it
        return
    if not differences:
        return
    run_config = paths.join(workdir, store.CONFIG_FILE)
    changed = (config_lib.differences(json.loads(paths.read_text(run_config)), config)
               if paths.exists(run_config) else [])
    fields = ", ".join(changed[:8]) + (", ..." if len(changed) > 8 else "")
    raise UserError(
        f"--workdir {workdir} holds checkpoints (step {step}) of another network or optimizer "
        f"than this config builds ({'; '.join(differences[:2])}); "
        + (f"the config differs from its {store.CONFIG_FILE} in {fields}. " if fields else "")
        + "Nothing was changed. Resume with the run's own config, or start a new run in another "
        f"workdir from these weights with --config.init_from={workdir}")


def load_weights(state: TrainState, source: str, shardings: Any) -> TrainState:
    """`state` with the params and EMA params of `source`'s latest checkpoint wherever an array
    of the same name and shape exists (the reference's non-strict --load_weights); the others
    keep their initial values, the optimizer and step are `state`'s. Logs what it took."""
    weights, step = store.read_weights(source)
    for key in ("params", "ema_params"):
        new = getattr(state, key)
        old = dict(zip(store.leaf_shapes(weights[key]), jax.tree.leaves(weights[key])))
        names, leaves = list(store.leaf_shapes(new)), jax.tree.leaves(new)
        take = [n in old and old[n].shape == x.shape for n, x in zip(names, leaves)]
        tree = jax.tree.unflatten(jax.tree.structure(new), [
            old[n].astype(x.dtype) if t else x for n, x, t in zip(names, leaves, take)])
        state = state.replace(**{key: jax.device_put(tree, getattr(shardings, key))})
    if not any(take):
        raise UserError(f"--config.init_from={source}: none of its arrays has the name and shape "
                        "of one of this config's network; give a run of the same network")
    left = [n for n, t in zip(names, take) if not t]
    logging.info("Started from %s (step %d): %d of %d arrays taken; kept at their initial "
                 "values: %s", source, step, sum(take), len(names), ", ".join(left) or "none")
    return state


def _train_iterator(config: ml_collections.ConfigDict, start_step: int, data_state: Any):
    """This process's part of every global batch, positioned at `start_step`."""
    pid, nproc = jax.process_index(), jax.process_count()
    if data_state is None and start_step > 0:
        logging.warning("The checkpoint holds no input-pipeline state for %d processes: the "
                        "input restarts at step %d (shuffled sources on a new order).", nproc,
                        start_step)
    it = data_pipeline.create_train_iterator(config, pid, nproc,
                                             start_step=start_step if data_state is None else 0)
    if data_state is not None:
        it.set_state(data_state)
    return it


def jit_train_step(cfm: CFM, tx: optax.GradientTransformation, config: ml_collections.ConfigDict,
                   mesh: jax.sharding.Mesh, shardings: Any) -> Any:
    """The update step jitted for `mesh`: the state in `shardings` (and donated), the first
    stage's params replicated, the batch split over every device."""
    replicated = sharding_lib.replicated(mesh)
    return jax.jit(make_train_step(cfm, tx, config),
                   in_shardings=(shardings, replicated, sharding_lib.batch_sharding(mesh)),
                   out_shardings=(shardings, replicated), donate_argnums=(0,))


def train_step_flops(config: ml_collections.ConfigDict, num_devices: int, counted: float | None,
                     *args: Any) -> float | None:
    """FLOPs per device of one training step on `args` (state, first stage params, batch; arrays
    or shapes), given XLA's count for the compiled step, `counted`. XLA counts a loop's body
    once: with the first stage coding in micro-batches (a loop), the count is the same step's
    without them, lowered (not compiled) unsharded on the default backend, split over
    `num_devices`."""
    if config.first_stage.micro_batch <= 0:
        return counted
    whole = config.copy_and_resolve_references()
    with whole.unlocked():
        whole.first_stage.micro_batch = 0
    step = make_train_step(CFM.from_config(whole), make_optimizer(whole.optim), whole)
    shapes = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), args)
    flops = flops_of(jax.jit(step).lower(*shapes))
    return flops / num_devices if flops else None


def build_run(config: ml_collections.ConfigDict, workdir: str) -> Run:
    """Mesh, model, state (auto-resumed), data, evaluator and the compiled update step."""
    mesh = sharding_lib.make_mesh(config.mesh)
    logging.info("Process %d of %d; mesh %s over %d devices (%s)", jax.process_index(),
                 jax.process_count(), dict(mesh.shape), mesh.size, jax.devices()[0].device_kind)
    cfm = CFM.from_config(config)
    init_rng, fs_rng, state_rng, eval_rng = jax.random.split(jax.random.PRNGKey(config.seed), 4)
    fs_params = sharding_lib.put_replicated(cfm.first_stage.init_params(fs_rng), mesh)
    tx = make_optimizer(config.optim)
    mngr = store.checkpoint_manager(workdir, config.keep_checkpoints, config.keep_every)
    state, data_state, shardings = _state(config, cfm, tx, mesh, mngr, workdir,
                                          (init_rng, state_rng))
    train_iter = _train_iterator(config, int(state.step), data_state)
    evaluator = Evaluator(cfm, config, data_pipeline.eval_images(config), mesh)
    first_batch = sharding_lib.global_batch(next(train_iter), mesh)
    train_step = jit_train_step(cfm, tx, config, mesh, shardings).lower(
        state, fs_params, first_batch).compile()
    peak = peak_tflops(jax.devices()[0].device_kind, jnp.dtype(cfm.unet.dtype).name)
    flops = train_step_flops(config, mesh.size, flops_of(train_step), state, fs_params,
                             first_batch)
    meter = Meter(config.batch_size, mesh.size, config.total_steps, flops, peak)
    return Run(config, mesh, cfm, fs_params, state, train_iter, first_batch, train_step,
               evaluator, mngr, meter, eval_rng)
