"""Tests of fmboost_jax/trainer.py and train.py: learning, checkpoints, resume, the demo."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from fmboost_jax.cfm.model import CFM
from fmboost_jax.data import photos
from fmboost_jax.train.state import create_train_state, make_optimizer
from fmboost_jax.train.loop import make_train_step, train_and_evaluate

from support import ROOT


def test_a_few_training_steps_lower_the_loss(tiny_config):
    cfm = CFM.from_config(tiny_config)
    tx = make_optimizer(tiny_config.optim)
    state = create_train_state(jax.jit(cfm.init_params)(jax.random.PRNGKey(0)), tx,
                               jax.random.PRNGKey(1))
    step = jax.jit(make_train_step(cfm, tx, tiny_config))
    data = photos.PhotoCrops(("astronaut",), 16, 8, seed=0)
    batch = {"image": jnp.asarray(data.batch(0)["image"])}
    losses = []
    for _ in range(25):
        state, m = step(state, {}, batch)
        losses.append(float(m["loss"]))
    assert np.isfinite(losses).all()
    assert np.mean(losses[-5:]) < 0.7 * np.mean(losses[:5])
    assert int(state.step) == 25


def _final_params(workdir):
    mngr = ocp.CheckpointManager(os.path.join(workdir, "checkpoints"),
                                 item_handlers={"state": ocp.StandardCheckpointHandler()})
    step = mngr.latest_step()
    restored = mngr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))
    mngr.close()
    return step, restored["state"]


def test_resumed_run_matches_an_uninterrupted_one(tiny_config, tmp_path):
    tiny_config.unet.update(channel_mult=(1,), attention_resolutions=())  # compiles faster
    full, part = str(tmp_path / "full"), str(tmp_path / "part")
    train_and_evaluate(tiny_config, full)                       # 6 steps in one go
    short = tiny_config.copy_and_resolve_references()
    short.total_steps = 3
    train_and_evaluate(short, part)                             # 3 steps, then stop
    step3, state3 = _final_params(part)
    assert step3 == 3 and int(state3["step"]) == 3
    final = train_and_evaluate(tiny_config, part)               # resumes at step 3
    assert final["step"] == 6
    (s_full, a), (s_part, b) = _final_params(full), _final_params(part)
    assert s_full == s_part == 6
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(x, y)
    from fmboost_jax.train.loop import restore_params
    for x, y in zip(jax.tree.leaves(restore_params(part)), jax.tree.leaves(b["ema_params"])):
        np.testing.assert_array_equal(x, y)
    lines = [json.loads(l) for l in open(os.path.join(part, "metrics.jsonl"))]
    train_steps = [l["step"] for l in lines if "loss" in l]
    assert train_steps == [2, 3, 4, 6]      # the short run logs its last step; none twice


@pytest.mark.slow
def test_the_demo_config_runs_end_to_end_from_the_command_line(tmp_path):
    workdir = tmp_path / "demo"
    cmd = [sys.executable, "-m", "fmboost_jax.train", "--config=configs/demo.py:smoke",
           f"--workdir={workdir}"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.load(open(workdir / "eval.json"))
    for key in ("cfm/psnr", "cfm/ssim", "bilinear/psnr", "bilinear/ssim", "bicubic/psnr",
                "bicubic/ssim", "nfe"):
        assert np.isfinite(result[key]), key
    assert result["step"] == 4
    grids = os.listdir(workdir / "samples")
    assert grids and all(g.endswith(".png") for g in grids)
    rows = [json.loads(l) for l in open(workdir / "metrics.jsonl")]
    for key in ("step", "loss", "lr", "grad_norm", "steps_per_sec"):
        assert key in rows[0]
    assert any(f.startswith("events") for f in os.listdir(workdir / "tensorboard"))


def test_a_nan_in_a_batch_stops_the_run_naming_the_step_and_keeps_the_last_checkpoint(
        tiny_config, tmp_path, monkeypatch):
    from fmboost_jax.data import pipeline
    real = pipeline.create_train_iterator

    class Poisoned:
        """The real iterator, with a NaN pixel in the batch of step 5 (0-based 4)."""

        def __init__(self, *args, **kwargs):
            self.it = real(*args, **kwargs)
            self.get_state, self.set_state = self.it.get_state, self.it.set_state

        def __next__(self):
            step = self.it.get_state()["step"]
            batch = next(self.it)
            if step == 4:
                batch["image"][0, 0, 0, 0] = np.nan
            return batch

    monkeypatch.setattr(pipeline, "create_train_iterator", Poisoned)
    tiny_config.unet.update(channel_mult=(1,), attention_resolutions=())
    tiny_config.checkpoint_every, tiny_config.log_every = 2, 10
    with pytest.raises(FloatingPointError, match=r"Non-finite training step 5: loss nan.*"
                       r"latest checkpoint \(step 4\) was written before it and is intact"):
        train_and_evaluate(tiny_config, str(tmp_path))
    step, state = _final_params(str(tmp_path))
    assert step == 4 and int(state["step"]) == 4
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(state))
