"""Tests of the benchmark scripts that run in CI: their smoke modes end well and print every
figure, and the figures hold together (timings, ratios, FLOPs against an independent count)."""

import math
import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def matmul_flops(jaxpr) -> int:
    """2 x the multiply-adds of every convolution and dot product of `jaxpr` (and of the jaxprs
    inside it): a count of a network's FLOPs that does not ask XLA."""
    from jax.extend.core import jaxprs_in_params
    total = 0
    for eqn in jaxpr.eqns:
        total += sum(matmul_flops(sub) for sub in jaxprs_in_params(eqn.params))
        out = eqn.outvars[0].aval.shape
        if eqn.primitive.name == "conv_general_dilated":
            kernel = eqn.invars[1].aval.shape
            spec = eqn.params["dimension_numbers"].rhs_spec        # (out, in, *window)
            total += 2 * math.prod(out) * math.prod(kernel[d] for d in spec[1:])
        elif eqn.primitive.name == "dot_general":
            (contracted, _), _ = eqn.params["dimension_numbers"]
            lhs = eqn.invars[0].aval.shape
            total += 2 * math.prod(out) * math.prod(lhs[d] for d in contracted)
    return total


def smoke_unet_forward_flops() -> int:
    """`matmul_flops` of the smoke run's UNet forward pass on one image."""
    import jax
    import jax.numpy as jnp

    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    import accelerator

    from fmboost_jax.models.unet import EfficientUNet
    s = accelerator.SMOKE
    model = EfficientUNet.from_config(accelerator.make_config(s, "bfloat16").unet.to_dict(),
                                      jnp.bfloat16)
    x = jax.ShapeDtypeStruct((1, s.latent, s.latent, 4), jnp.float32)
    t = jax.ShapeDtypeStruct((1,), jnp.float32)
    params = jax.eval_shape(model.init, jax.random.PRNGKey(0), x, t, x)
    return matmul_flops(jax.make_jaxpr(model.apply)(params, x, t, x).jaxpr)


def close(value: float, expected: float, rel: float = 0.0, abs_: float = 0.0) -> bool:
    return math.isfinite(value) and abs(value - expected) <= rel * abs(expected) + abs_


def test_accelerator_benchmark_smoke():
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "accelerator.py"),
                           "--smoke"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    assert out.startswith("accelerator benchmark (smoke")
    assert re.search(r"\nmachine: \w+:.+ x\d+.*, cpu='.*' cores=\d+, jax \S+, python \S+.*; "
                     r"UNet attention: (einsum|cudnn)\n", out), out
    for line in ("train step, batch 1,", "train step, batch 2,", "training step, batch 1, 64² px",
                 "PyTorch step, batch 1,",
                 "ratio fmboost_jax / PyTorch, batch 2:", "sample: 2 Euler NFE, batch 2,",
                 "VAE decode, one 64² image", "boost 32² -> 64² px, 2 Euler NFE, batch 1:"):
        assert line in out, (line, out)
    table = out[out.index("part    batch"):].splitlines()
    assert table[-1].startswith("total ")
    rows = [r.split(maxsplit=7) for r in table[2:-1]]
    assert [r[0] for r in rows] == ["train", "train", "step", "torch", "torch", "sample", "vae",
                                   "boost"]
    ms = {}
    for part, batch, ms_call, ms_img, img_s, _, peak, _ in rows:   # the timings are real
        batch, ms_call, ms_img, img_s, peak = int(batch), *map(float, (ms_call, ms_img, img_s,
                                                                         peak))
        assert ms_call > 0 and peak > 0 and math.isfinite(peak), (part, rows)
        assert close(ms_img, ms_call / batch, abs_=0.1), (part, ms_call, ms_img)
        assert close(img_s, 1e3 * batch / ms_call, rel=0.06 / ms_call + 1e-3), (part, img_s)
        ms[part, batch] = ms_call

    ratios = re.findall(r"ratio fmboost_jax / PyTorch, batch (\d+): ([\d.]+) / ([\d.]+) ms = "
                        r"([\d.]+) \(fmboost_jax ([\d.]+)x (faster|slower)\)", out)
    assert [int(r[0]) for r in ratios] == [1, 2], out
    for batch, ours, theirs, ratio, speed, word in ratios:
        ours, theirs, ratio, speed = map(float, (ours, theirs, ratio, speed))
        assert (ours, theirs) == (ms["train", int(batch)], ms["torch", int(batch)])
        assert close(ratio, ours / theirs, rel=0.06 / ours + 0.06 / theirs, abs_=1e-3)
        assert close(speed, 1 / ratio if word == "faster" else ratio, rel=0.01, abs_=0.01)
        assert (word == "faster") == (ratio < 1)

    # XLA's FLOPs of the compiled programs, per image, against a count of the network's own:
    # the training step is about 3 forward passes (forward, and backward for inputs and
    # weights), the ODE solve NFE of them.
    forward = smoke_unet_forward_flops()
    gflop = {label: float(g) for label, g in re.findall(r"^(train step, batch \d|sample)[,:] .*, "
                                                        r"([\d.e+-]+) GFLOP/img", out, re.M)}
    assert set(gflop) == {"train step, batch 1", "train step, batch 2", "sample"}, out
    for label, expected in (("train step, batch 1", 3 * forward),
                            ("train step, batch 2", 3 * forward), ("sample", 2 * forward)):
        assert close(gflop[label] * 1e9, expected, rel=0.15), (label, gflop[label], expected)


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


def test_benchmark_options_are_parsed_by_the_package_parser():
    import argparse

    import pytest
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    from arguments import joined, names, numbers
    ap = argparse.ArgumentParser(exit_on_error=False)
    ap.add_argument("--parts", type=names(("train", "torch", "vae")), default="train,vae")
    ap.add_argument("--sizes", type=numbers(int), default="")
    ap.add_argument("--scales", type=numbers(float), default="0,1.5")
    args = ap.parse_args([])
    assert (args.parts, args.sizes, args.scales) == (("train", "vae"), (), (0.0, 1.5))
    args = ap.parse_args(["--parts", "vae, train,vae", "--sizes", "256,512"])
    assert (args.parts, args.sizes) == (("vae", "train"), (256, 512))
    assert joined(args.parts) == "vae,train" and joined(args.sizes) == "256,512"
    with pytest.raises(argparse.ArgumentError, match="unknown 'sample' \\(known: train, torch"):
        ap.parse_args(["--parts", "train,sample"])
    with pytest.raises(argparse.ArgumentError, match="'256,x' is not a comma-separated list"):
        ap.parse_args(["--sizes", "256,x"])


@pytest.mark.parametrize("config,coded", [("lhq", ["decode"]), ("demo", [])])
def test_the_whole_boost_is_timed_against_the_same_boost_in_pytorch(config, coded):
    """The released latent pipeline (a VAE to decode) and the pixel-space demo (none)."""
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "boost_vs_torch.py"),
                           "--config", config, "--smoke", "--nfe", "1,2", "--repeats", "1"],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    parts = dict(re.findall(r"\n(encode|one NFE|decode|boost, \d NFE) +(.+)", out))
    assert list(parts) == ["encode", "one NFE", *coded, "boost, 1 NFE", "boost, 2 NFE"], out
    per_pixel = re.search(r"\nper output pixel, boost, 2 NFE: fmboost_jax (\S+) µs, PyTorch (\S+) µs", out)
    assert per_pixel and close(float(per_pixel[1]), float(parts["boost, 2 NFE"].split()[0])
                               / 64 ** 2 * 1e6, rel=6e-3), out   # printed to 3 digits
    for row in parts.values():                    # ours, theirs, the ratio and its spread
        ours, theirs, ratio = (float(v) for v in row.split()[:3])
        assert ours > 0 and theirs > 0 and close(ratio, ours / theirs, rel=2e-3, abs_=0.006)
    # the same weights, photo and noise: both sides make the same image
    diff = float(re.search(r"images: 64x64, largest difference (\S+)", out)[1])
    assert diff < 1e-4, out
    assert re.search(r"\nmachine: .*cores=\d+.*; torch threads \d+\n", out)
    assert re.fullmatch(r"boost: fmboost_jax / PyTorch = \d+\.\d\d \(spread \d+\.\d\d–\d+\.\d\d\)",
                        out.splitlines()[-1])
