"""Runs training steps and the sample function on one device, data-parallel and FSDP meshes;
prints the differences.

Run in a fresh process with 8 fake CPU devices (tests/test_sharding.py does this):
    XLA_FLAGS=--xla_force_host_platform_device_count=8 python tests/sharded_step.py
"""

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax
import numpy as np
import tiny_config

from fmboost_jax.cfm.model import CFM
from fmboost_jax.cfm.sampling import make_sample_fn
from fmboost_jax.data import photos
from fmboost_jax.parallel import sharding
from fmboost_jax.train.state import create_train_state, make_optimizer
from fmboost_jax.train.step import make_train_step

STEPS = 2


def run(config, mesh):
    cfm = CFM.from_config(config)
    tx = make_optimizer(config.optim)
    init = lambda: create_train_state(cfm.init_params(jax.random.PRNGKey(0)), tx,
                                      jax.random.PRNGKey(1))
    state_sh = sharding.state_shardings(jax.eval_shape(init), mesh, config.fsdp_min_size)
    state = jax.jit(init, out_shardings=state_sh)()
    rep = sharding.replicated(mesh)
    step = jax.jit(make_train_step(cfm, tx, config),
                   in_shardings=(state_sh, rep, sharding.batch_sharding(mesh)),
                   out_shardings=(state_sh, rep), donate_argnums=(0,))
    data = photos.PhotoCrops(tuple(config.data.train_photos), config.high_res_size,
                             config.batch_size, seed=0)
    losses = []
    for i in range(STEPS):
        state, m = step(state, {}, sharding.global_batch(data.batch(i), mesh))
        losses.append(float(m["loss"]))
    sharded = sum(not s.is_fully_replicated for s in jax.tree.leaves(state_sh))
    # The notebook sample function on a batch split over the mesh, with the sharded params.
    lowres = cfm.lowres_images(data.batch(STEPS)["image"])
    out = make_sample_fn(cfm, solver="euler", num_steps=2)(
        state.ema_params, {}, sharding.put_batch(np.asarray(lowres), mesh), jax.random.PRNGKey(2))
    return losses, jax.device_get(state), sharded, np.asarray(out.images)


def main():
    assert jax.device_count() == 8, jax.devices()
    config = tiny_config.get_config("flat")        # one level, no attention: compiles fastest
    config.batch_size = 8
    config.fsdp_min_size = 256
    one = sharding.make_mesh((("data", 1), ("fsdp", 1)), jax.devices()[:1])
    results = {"single": run(config, one),
               "data_parallel": run(config, sharding.make_mesh((("data", -1), ("fsdp", 1)))),
               "fsdp": run(config, sharding.make_mesh((("data", 2), ("fsdp", 4))))}
    ref_losses, ref_state, _, ref_images = results["single"]
    report = {}
    for name, (losses, state, sharded, images) in results.items():
        diffs = [float(np.max(np.abs(a - b)))
                 for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(ref_state))]
        scale = max(float(np.max(np.abs(a))) for a in jax.tree.leaves(ref_state.params))
        report[name] = {"losses": losses, "loss_diff": float(np.max(np.abs(
            np.subtract(losses, ref_losses)))), "max_state_diff": max(diffs),
            "param_scale": scale, "sharded_arrays": sharded, "step": int(state.step),
            "sample_diff": float(np.max(np.abs(images - ref_images)))}
    print("RESULT " + json.dumps(report))


if __name__ == "__main__":
    main()
