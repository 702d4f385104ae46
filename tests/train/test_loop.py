"""Tests of fmboost_jax/train/loop.py: learning, resume, NaN handling, latent-space training, and
a training step that compiles once per run."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from support import config, flat_unet

from fmboost_jax.cfm.model import CFM
from fmboost_jax.data import photos
from fmboost_jax.train.loop import train_and_evaluate
from fmboost_jax.train.state import create_train_state, make_optimizer
from fmboost_jax.train.step import make_train_step


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
    lines = [json.loads(row) for row in open(os.path.join(part, "metrics.jsonl"))]
    train_steps = [row["step"] for row in lines if "loss" in row]
    assert train_steps == [2, 3, 4, 6]      # the short run logs its last step; none twice


def test_a_nan_in_a_batch_stops_the_run_naming_the_step_and_keeps_the_last_checkpoint(
        tiny_config, tmp_path, monkeypatch):
    from fmboost_jax.data import pipeline
    real = pipeline.create_train_iterator

    class Poisoned:
        """The real iterator, with a NaN pixel in the batch of step 5 (0-based 4)."""

        def __init__(self, *args, **kwargs):
            self.it = real(*args, **kwargs)
            self.get_state, self.set_state = self.it.get_state, self.it.set_state
            self.close = self.it.close

        def __next__(self):
            step = self.it.get_state()["step"]
            batch = next(self.it)
            if step == 4:
                batch["image"][0, 0, 0, 0] = np.nan
            return batch

    monkeypatch.setattr(pipeline, "create_train_iterator", Poisoned)
    tiny_config.checkpoint_every, tiny_config.log_every = 2, 10
    with pytest.raises(FloatingPointError, match=r"Non-finite training step 5: loss nan.*"
                       r"latest checkpoint \(step 4\) was written before it and is intact"):
        train_and_evaluate(tiny_config, str(tmp_path))
    step, state = _final_params(str(tmp_path))
    assert step == 4 and int(state["step"]) == 4
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(state))


@pytest.mark.slow
def test_the_lhq_config_trains_in_latent_space_and_samples(tmp_path):
    c = flat_unet(config("lhq:smoke"))        # the latent path; the UNet's depth does not matter
    final = train_and_evaluate(c, str(tmp_path))
    assert final["step"] == 3 and final["eval_size"] == 64
    for key in ("cfm/psnr", "cfm/ssim", "bilinear/psnr", "bicubic/psnr"):
        assert np.isfinite(final[key]), key
    assert final["nfe"] == 2
    rows = [json.loads(row) for row in open(tmp_path / "metrics.jsonl")]
    losses = [r["loss"] for r in rows if "loss" in r]
    assert len(losses) == 3 and all(np.isfinite(losses))
    assert os.listdir(tmp_path / "samples")
    # The final PSNR is that of sampling the held-out set in latent space with the saved EMA
    # params, as the run's evaluator keys it (chunk 0 of the eval key folded with the step).
    from fmboost_jax.cfm.sampling import make_sample_fn, solver_options
    from fmboost_jax.checkpoints.store import read_weights
    from fmboost_jax.data import pipeline
    from fmboost_jax.evaluation.metrics import psnr
    cfm = CFM.from_config(c)
    _, fs_rng, _, eval_rng = jax.random.split(jax.random.PRNGKey(c.seed), 4)
    weights, step = read_weights(str(tmp_path))
    truth = jnp.asarray(pipeline.eval_images(c))
    assert step == 3 and len(truth) <= (c.eval_batch_size or c.batch_size)      # one chunk
    out = make_sample_fn(cfm, **solver_options(c.sampling), throw=False)(
        weights["ema_params"], cfm.first_stage.init_params(fs_rng), cfm.lowres_images(truth),
        jax.random.fold_in(jax.random.fold_in(eval_rng, 3), 0))
    assert out.latents.shape == (len(truth), 8, 8, 4)       # 64 px through the VAE's factor 8
    assert float(jnp.mean(psnr(jnp.clip(out.images, -1, 1), truth))) == pytest.approx(
        final["cfm/psnr"], abs=1e-4)


def _lowerings(run) -> int:
    """How many programs `run()` lowered to XLA (a new trace or a recompilation each)."""
    count = [0]

    def listen(event: str, duration: float, **kwargs) -> None:
        if event == "/jax/core/compile/jaxpr_to_mlir_module_duration":
            count[0] += 1

    jax.monitoring.register_event_duration_secs_listener(listen)
    try:
        run()
    finally:
        jax.monitoring.unregister_event_duration_listener(listen)
    return count[0]


def test_the_training_step_compiles_once_per_run_however_long_it_runs(tiny_config, tmp_path):
    counts = []
    for total in (2, 6):
        c = tiny_config.copy_and_resolve_references()
        c.total_steps, c.eval_every, c.checkpoint_every, c.log_every = total, total, 2, 1
        workdir = str(tmp_path / f"run{total}")
        counts.append(_lowerings(lambda c=c, workdir=workdir: train_and_evaluate(c, workdir)))
    assert counts[0] == counts[1], counts
