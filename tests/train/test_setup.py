"""Tests of fmboost_jax/train/setup.py: the start-up checks of files, devices and data."""

import pytest

from fmboost_jax.errors import ConfigError
from fmboost_jax.train.setup import check_resources, startup_checks, validate


def test_the_mesh_and_the_batch_must_fit_this_machines_devices(tiny_config):
    tiny_config.mesh = (("data", 3), ("fsdp", 1))       # valid as a value, not on 1 device
    validate(tiny_config)
    with pytest.raises(ConfigError, match=r"config\.mesh: .*needs 3 devices"):
        check_resources(tiny_config)


def test_a_vae_checkpoint_must_exist_and_random_weights_need_none(tiny_config, tmp_path):
    from support import config
    c = config("lhq:smoke")
    check_resources(c)                                   # checkpoint="random"
    c.first_stage.checkpoint = str(tmp_path / "vae")
    with pytest.raises(ConfigError, match=r"first_stage\.checkpoint: '.*vae' does not exist"):
        check_resources(c)


def test_data_that_cannot_be_read_stops_the_start_up(tiny_config, tmp_path):
    tiny_config.data.update(name="folder", path=str(tmp_path / "none"))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        startup_checks(tiny_config)


def _files(root) -> dict[str, tuple[int, int]]:
    """Every file under `root` with its size and modification time."""
    import os
    out = {}
    for folder, _, names in os.walk(root):
        for name in names:
            st = os.stat(os.path.join(folder, name))
            out[os.path.join(folder, name)] = (st.st_size, st.st_mtime_ns)
    return out


def test_resuming_with_another_optimizer_is_refused_in_one_line_touching_nothing(reference_run,
                                                                                 tmp_path):
    """The command line: a run trained without gradient clipping, resumed with it, stops with
    one line naming the field and status 2, with every file as it was; the unchanged command
    (a longer run is fine) then resumes from the latest step."""
    import shutil

    from training_runs import FINAL_ONLY, TOTAL, finish, start, steps
    workdir = tmp_path / "run"
    shutil.copytree(reference_run, workdir)
    before = _files(workdir)
    config_json = (workdir / "config.json").read_bytes()
    proc = start(workdir, FINAL_ONLY, "--config.optim.grad_clip_norm=1.0")
    out = finish(proc)
    errors = [line for line in out.splitlines() if line.startswith("error: ")]
    assert proc.returncode == 2 and len(errors) == 1 and "Traceback" not in out, out[-3000:]
    assert "config.optim.grad_clip_norm: 0.0 -> 1.0" in errors[0]
    assert "Nothing was changed" in errors[0] and "--config.init_from=" in errors[0]
    assert _files(workdir) == before and (workdir / "config.json").read_bytes() == config_json
    out = finish(start(workdir, FINAL_ONLY, f"--config.total_steps={TOTAL + 1}"))
    assert f"Restoring checkpoint of step {TOTAL}" in out, out[-3000:]
    assert steps(workdir)[-1] == TOTAL + 1, out[-3000:]


def test_another_network_is_refused_naming_the_field_and_init_from_starts_from_its_weights(
        tiny_workdir, tmp_path):
    """In process: a wider UNet is refused before anything is written; a new run with another
    optimizer, started from the old run's weights (`init_from`), holds its params and EMA params
    at step 0; a wider one takes the arrays that kept their shape."""
    import json
    import shutil

    import jax
    import ml_collections
    import numpy as np

    from fmboost_jax.checkpoints.store import read_weights
    from fmboost_jax.errors import UserError
    from fmboost_jax.train.loop import train_and_evaluate
    from fmboost_jax.train.setup import build_run
    workdir = tmp_path / "copy"
    shutil.copytree(tiny_workdir, workdir)
    config = ml_collections.ConfigDict(json.loads((workdir / "config.json").read_text()))
    before = _files(workdir)
    wider = config.copy_and_resolve_references()
    wider.unet.model_channels = 2 * config.unet.model_channels
    with pytest.raises(UserError, match=r"config\.unet\.model_channels: 32 -> 64.*Nothing was "
                                        r"changed"):
        train_and_evaluate(wider, str(workdir))
    assert _files(workdir) == before

    clipped = config.copy_and_resolve_references()
    clipped.update(init_from=str(workdir))
    clipped.optim.grad_clip_norm = 1.0
    run = build_run(clipped, str(tmp_path / "new"))
    weights, step = read_weights(str(workdir))
    assert int(run.state.step) == 0 and step == 2
    for key in ("params", "ema_params"):
        for a, b in zip(jax.tree.leaves(getattr(run.state, key)), jax.tree.leaves(weights[key])):
            np.testing.assert_array_equal(np.asarray(a), b)
    run.checkpoints.close()
    wider.init_from = str(workdir)            # non-strict: what keeps its shape is taken
    run = build_run(wider, str(tmp_path / "wider"))
    np.testing.assert_array_equal(np.asarray(run.state.params["out_2"]["bias"]),
                                  weights["params"]["out_2"]["bias"])
    assert run.state.params["out_2"]["kernel"].shape != weights["params"]["out_2"]["kernel"].shape
    run.checkpoints.close()


def test_flops_of_a_micro_batched_step_count_every_image_as_the_whole_batch_does():
    import jax
    from support import config, flat_unet

    from fmboost_jax.cfm.model import CFM
    from fmboost_jax.data import pipeline
    from fmboost_jax.parallel import sharding
    from fmboost_jax.train.meter import flops_of
    from fmboost_jax.train.setup import jit_train_step, train_step_flops
    from fmboost_jax.train.state import create_train_state, make_optimizer

    def step_and_args(micro_batch):
        c = flat_unet(config("lhq:smoke"))
        c.first_stage.micro_batch = micro_batch
        mesh = sharding.make_mesh(c.mesh)
        cfm, tx = CFM.from_config(c), make_optimizer(c.optim)
        key = jax.random.PRNGKey(0)
        state = jax.eval_shape(lambda: create_train_state(cfm.init_params(key), tx, key))
        args = (state, jax.eval_shape(cfm.first_stage.init_params, key),
                {k: jax.ShapeDtypeStruct(*spec) for k, spec in
                 pipeline.batch_spec(c, c.batch_size).items()})
        shardings = sharding.state_shardings(state, mesh, c.fsdp_min_size)
        return c, flops_of(jit_train_step(cfm, tx, c, mesh, shardings).lower(*args).compile()), args

    _, whole, _ = step_and_args(0)
    c, looped, args = step_and_args(1)
    assert looped < 0.9 * whole              # XLA counts the VAE's loop body once
    assert train_step_flops(c, 1, looped, *args) == pytest.approx(whole, rel=0.02)
    assert train_step_flops(c, 2, looped, *args) == pytest.approx(whole / 2, rel=0.02)
