"""Tests of fmboost_jax/sharding.py: mesh resolution, FSDP rules, and sharded training steps that
match the single-device step (8 fake CPU devices in a subprocess)."""

import json
import os
import subprocess
import sys

import pytest
from support import ROOT, devices_env

from fmboost_jax.parallel import sharding


def test_mesh_sizes_resolve_minus_one_to_the_remaining_devices():
    assert sharding.mesh_shape((("data", -1), ("fsdp", 1)), 8) == (8, 1)
    assert sharding.mesh_shape((("data", 2), ("fsdp", -1)), 8) == (2, 4)
    assert sharding.mesh_shape((("fsdp", 4), ("data", 2)), 8) == (4, 2)


@pytest.mark.parametrize("axes, devices, message", [
    ((("data", 3), ("fsdp", -1)), 8, "not divisible"),
    ((("data", 2), ("fsdp", 2)), 8, "needs 4 devices"),
    ((("data", -1), ("fsdp", -1)), 8, "at most one -1"),
    ((("data", -1), ("model", 1)), 8, "axes must be"),
])
def test_bad_meshes_are_rejected_with_the_reason(axes, devices, message):
    with pytest.raises(ValueError, match=message):
        sharding.mesh_shape(axes, devices)


def test_fsdp_shards_the_largest_divisible_dimension_of_big_arrays_only():
    assert sharding.fsdp_spec((3, 3, 64, 128), 4, 1000) == sharding.P(None, None, None, "fsdp")
    assert sharding.fsdp_spec((512, 6), 4, 1000) == sharding.P("fsdp", None)
    assert sharding.fsdp_spec((3, 3, 6, 7), 4, 10) == sharding.P()         # nothing divides
    assert sharding.fsdp_spec((128,), 4, 1000) == sharding.P()             # too small
    assert sharding.fsdp_spec((3, 3, 64, 128), 1, 0) == sharding.P()       # no fsdp axis


@pytest.mark.slow
def test_data_parallel_and_fsdp_steps_and_samples_match_the_single_device_ones():
    env = devices_env(8)
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "tests", "sharded_step.py")],
                          capture_output=True, text=True, env=env, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = next(row for row in proc.stdout.splitlines() if row.startswith("RESULT "))
    report = json.loads(line[len("RESULT "):])
    assert report["fsdp"]["sharded_arrays"] > 50          # FSDP really shards the state
    assert report["data_parallel"]["sharded_arrays"] == 0
    for name in ("data_parallel", "fsdp"):
        r = report[name]
        assert r["step"] == 2
        # Same math, different reduction order: float32 rounding only. Adam divides by the
        # gradient's RMS, so parameter differences are ~1e-5 of their scale after a few steps.
        assert r["loss_diff"] <= 1e-6 * max(report["single"]["losses"]) + 1e-9, r
        assert r["max_state_diff"] <= 1e-4 * r["param_scale"], r
        assert r["sample_diff"] <= 1e-4, r                # images in [-1, 1]
