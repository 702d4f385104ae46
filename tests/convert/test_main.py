"""Tests of `python -m fmboost_jax.convert` (fmboost_jax/convert/__main__.py): bad files end in
one line and status 2, and nothing is written."""

import os
import subprocess
import sys

import pytest
from support import ROOT


@pytest.mark.parametrize("network, extra", [("vae", []), ("unet", ["--config", "configs/demo.py"])])
def test_random_bytes_are_called_not_a_checkpoint_in_one_line(tmp_path, network, extra):
    src = tmp_path / "random-bytes.ckpt"
    src.write_bytes(os.urandom(4096))
    proc = subprocess.run([sys.executable, "-m", "fmboost_jax.convert", network, "--src", str(src),
                           "--dst", str(tmp_path / "out"), *extra],
                          capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in proc.stderr
    assert "random-bytes.ckpt is not a readable PyTorch checkpoint" in lines[0]
    assert "allow" not in lines[0]
    assert not (tmp_path / "out").exists()
    debug = subprocess.run(proc.args, capture_output=True, text=True, cwd=ROOT, timeout=120,
                           env=dict(os.environ, FMBOOST_DEBUG="1"))
    assert debug.returncode != 0 and "Traceback" in debug.stderr     # the switch that shows it
