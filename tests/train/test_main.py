"""Tests of `python -m fmboost_jax.train` (fmboost_jax/train/__main__.py) and the console
scripts: a run end to end, and user errors answered in one line before any work."""

import json
import os
import subprocess
import sys
import tomllib

import numpy as np
import pytest
from support import ROOT


def _train(tmp_path, *flags):
    return subprocess.run([sys.executable, "-m", "fmboost_jax.train", *flags], cwd=ROOT,
                          capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_a_run_with_the_papers_coupling_runs_end_to_end_from_the_command_line(tmp_path):
    """The paper's coupling (noised source) and an SDE sampler for its evaluation, on the tests'
    tiny config (the demo itself runs from the command line in tests/test_docs.py)."""
    workdir = tmp_path / "paper"
    proc = _train(tmp_path, "--config=tests/tiny_config.py:flat", f"--workdir={workdir}",
                  "--config.total_steps=4", "--config.eval_every=4", "--config.checkpoint_every=2",
                  "--config.coupling.noising_step=400", "--config.sampling.solver=euler_maruyama")
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.load(open(workdir / "eval.json"))
    assert result["sampler"]["solver"] == "euler_maruyama"
    assert result["nfe"] == 2 + 1                     # 2 steps and the last step
    for key in ("cfm/psnr", "cfm/ssim", "bilinear/psnr", "bilinear/ssim", "bicubic/psnr",
                "bicubic/ssim", "nfe"):
        assert np.isfinite(result[key]), key
    assert result["step"] == 4
    grids = os.listdir(workdir / "samples")
    assert grids and all(g.endswith(".png") for g in grids)
    rows = [json.loads(row) for row in open(workdir / "metrics.jsonl")]
    for key in ("step", "loss", "lr", "grad_norm", "steps_per_sec"):
        assert key in rows[0]
    assert any(f.startswith("events") for f in os.listdir(workdir / "tensorboard"))


def test_a_missing_vae_checkpoint_is_one_line_saying_how_to_make_it(tmp_path):
    workdir = tmp_path / "lhq"
    proc = _train(tmp_path, "--config=lhq", f"--workdir={workdir}",   # a name of configs/
                  "--config.first_stage.checkpoint=/no/vae")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "error: config.first_stage.checkpoint: '/no/vae' does not exist" in proc.stderr
    assert "python -m fmboost_jax.convert vae --src FILE --dst DIR" in proc.stderr
    assert not workdir.exists()                       # nothing written before the check


def test_an_sde_solver_for_the_demos_own_coupling_is_refused_before_training(tmp_path):
    workdir = tmp_path / "demo"
    proc = _train(tmp_path, "--config", "demo:smoke", f"--workdir={workdir}",
                  "--config.sampling.solver=euler_maruyama")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "error: config.coupling.noising_step: is -1" in proc.stderr
    assert not workdir.exists()


def test_missing_data_is_one_line_naming_the_path(tmp_path):
    proc = _train(tmp_path, "--config=configs/demo.py:smoke", f"--workdir={tmp_path / 'run'}",
                  "--config.data.name=folder", f"--config.data.path={tmp_path / 'nowhere'}")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "nowhere" in proc.stderr and "does not exist" in proc.stderr


def test_every_console_script_names_a_function_of_its_module():
    import ast
    import importlib.util
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        scripts = tomllib.load(f)["project"]["scripts"]
    assert set(scripts) == {"fmboost-train", "fmboost-convert", "fmboost-precompute",
                            "fmboost-prepare", "fmboost-upsample", "fmboost-evaluate",
                            "fmboost-plan", "fmboost-app"}
    for target in scripts.values():      # read, not imported: each module defines absl flags
        module, _, name = target.partition(":")
        with open(importlib.util.find_spec(module).origin) as f:
            defined = {n.name for n in ast.parse(f.read()).body if isinstance(n, ast.FunctionDef)}
        assert name in defined, target
