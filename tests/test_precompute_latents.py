"""Tests of `python -m fmboost_jax.precompute_latents`: a config it cannot use is one line."""

import subprocess
import sys

from support import ROOT


def test_a_pixel_space_config_is_refused_in_one_line_naming_the_field(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "fmboost_jax.precompute_latents", "--config=configs/demo.py",
         f"--workdir={tmp_path / 'out'}", "--config.data.name=folder",
         f"--config.data.path={tmp_path}"],
        cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "error: config.first_stage.name: is 'identity'" in proc.stderr
    assert not (tmp_path / "out").exists()
