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


def test_conv_profile_finds_every_convolution_of_the_network():
    import jax
    import jax.numpy as jnp

    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    import bench_unet_step
    import conv_profile

    from fmboost_jax.config import base_config
    from fmboost_jax.models.unet import EfficientUNet
    cfg = base_config().unet
    cfg.update(bench_unet_step.CONFIGS["ref15m"][0])
    model = EfficientUNet.from_config(cfg)
    convs = conv_profile.network_convs(model, batch=2, size=32)
    x = jnp.zeros((2, 32, 32, 4))
    params = jax.eval_shape(model.init, jax.random.PRNGKey(0), x, jnp.zeros((2,)), x)
    kernels = [p.shape for p in jax.tree.leaves(params) if p.ndim == 4]
    assert sum(convs.values()) == len(kernels) == 51
    assert sorted(k for (_, k, _, _), n in convs.items() for _ in range(n)) == sorted(kernels)
    assert convs[((2, 32, 32, 64), (3, 3, 64, 64), 1, "1,1")] == 7
    assert convs[((2, 32, 32, 64), (3, 3, 64, 64), 2, "1,1")] == 1
