"""Tests of the benchmark scripts that run in CI: their smoke modes end well and print every
figure."""

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_accelerator_benchmark_smoke():
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "accelerator.py"),
                           "--smoke"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    assert out.startswith("accelerator benchmark (smoke")
    assert "\nmachine: " in out and "jax " in out
    for line in ("train step, batch 1,", "train step, batch 2,", "PyTorch step, batch 1,",
                 "ratio fmboost_jax / PyTorch, batch 2:", "sample: 2 Euler NFE, batch 2,",
                 "VAE decode, one 64² image", "boost 32² -> 64² px, 2 Euler NFE, batch 1:"):
        assert line in out, (line, out)
    table = out[out.index("part    batch"):].splitlines()
    assert [r.split()[0] for r in table[2:-1]] == ["train", "train", "torch", "torch", "sample",
                                                  "vae", "boost"]
    assert table[-1].startswith("total ")
