"""The fit plan: TPU slices by name, the largest-batch rule, and `python -m fmboost_jax.plan`
compiling a config's training step and boost for a real TPU topology with libtpu."""

import subprocess
import sys

import pytest
from support import ROOT

from fmboost_jax.errors import UserError
from fmboost_jax.parallel import tpu
from fmboost_jax.plan import GiB, Usage, fit


@pytest.mark.parametrize("name, chips, topology", [
    ("v4-8", 4, "v4:2x2x1"), ("v4-32", 16, "v4:2x2x4"), ("v4-128", 64, "v4:4x4x4"),
    ("v5p-8", 4, "v5:2x2x1"), ("v5p-64", 32, "v5:2x4x4"),
    ("v5litepod-16", 16, "v5e:4x4"), ("v5e-8", 8, "v5e:2x4"), ("v5e-1", 1, "v5e:1x1"),
    ("v6e-8", 8, "v6e:2x4"), ("v6e-256", 256, "v6e:16x16"), ("v5e:2x2", 4, "v5e:2x2"),
])
def test_accelerator_types_name_cloud_tpus_chip_grids(name, chips, topology):
    s = tpu.tpu_slice(name)
    assert (s.chips, s.topology) == (chips, topology)


@pytest.mark.parametrize("name, says", [
    ("v7-8", "not a TPU slice"), ("v4-4", "at least 8"), ("v5e-12", "power of two"),
    ("v4:2x2", "has 3 sizes"), ("gpu", "not a TPU slice"),
])
def test_a_slice_that_does_not_exist_is_named(name, says):
    with pytest.raises(UserError, match=f"--topology '{name}': .*{says}"):
        tpu.tpu_slice(name)


def usage(peak_gib: float) -> Usage:
    return Usage(int(peak_gib * GiB), 0, 0, 0, 0, 1.0)


def test_the_largest_batch_follows_the_line_through_two_compiles():
    memory = lambda b: 3.0 + 1.5 * b               # GiB: fixed state, then per example
    asked = []

    def at(b):
        asked.append(b)
        return usage(memory(b)) if memory(b) <= 16 else None
    result = fit(at, 2, 16 * GiB)
    assert asked == [2, 4] and result.largest == 8 and result.usage.peak == 6 * GiB
    asked.clear()
    result = fit(at, 16, 16 * GiB)                  # 16 does not fit, 8 does: at least 8
    assert asked == [16, 8] and result.usage is None and (result.largest, result.refused) == (8, 16)
    assert result.line(16 * GiB).endswith("at least 8 and fewer than 16 examples per chip fit")
    asked.clear()
    result = fit(at, 8, 16 * GiB)                   # 8 fits, 16 does not: a bound, not a fit
    assert asked == [8, 16] and (result.largest, result.refused) == (8, 16)
    asked.clear()
    assert fit(at, 2, 16 * GiB, largest=False).largest == 0 and asked == [2]


def test_libtpu_says_how_much_hbm_a_v5e_chip_leaves_to_programs():
    s = tpu.tpu_slice("v5e-4")
    assert tpu.usable_hbm(s, tpu.devices(s)[0]) == int(15.75 * GiB)


# The tests' tiny pixel config: its training step compiles for a v5e slice in 9 s and its boost
# in 1 s, lhq:smoke's (with the VAE) in 11 s and 10 s; the plan reads any config the same way.
def plan(*args, cache):
    return subprocess.run(
        [sys.executable, "-m", "fmboost_jax.plan", "--config=tests/tiny_config.py:flat",
         "--topology=v5e-4",
         f"--cache_dir={cache}", *args], cwd=ROOT, capture_output=True, text=True, timeout=600)


def test_a_config_is_planned_for_a_v5e_slice_and_kept(tmp_path):
    first = plan("--nolargest", cache=tmp_path)
    assert first.returncode == 0, first.stderr[-2000:]
    lines = first.stdout.splitlines()
    assert "4 chips (v5e:2x2), 15.75 GiB of HBM per chip" in lines[0]
    assert lines[1].startswith("training step: 2 examples per chip: peak ")
    assert lines[2].startswith("boost (euler, 4² -> 16² px): 1 images per chip: peak ")
    assert "FLOPs per chip" in lines[1] and "FLOPs" not in lines[2]    # a loop's body counts once
    assert lines[-1].startswith("plan: tests/tiny_config.py:flat on v5e-4: peak ")
    assert lines[-1].endswith("of 15.75 GiB per chip at per-chip batch 2, fits")
    assert first.stderr.count("compiling for v5e:2x2") == 2
    again = plan("--nolargest", cache=tmp_path)
    assert again.stdout == first.stdout and "compiling" not in again.stderr
    assert again.stderr.count("from the plan cache") == 2


def test_a_batch_beyond_the_chips_memory_does_not_fit(tmp_path):
    proc = plan("--nolargest", "--noboost", "--config.batch_size=262144", cache=tmp_path)
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert "refused: its temporaries alone need" in proc.stderr
    assert proc.stdout.splitlines()[-1] == (
        "plan: tests/tiny_config.py:flat on v5e-4: peak more than 15.75 GiB per chip at per-chip "
        "batch 65536, does not fit")


def test_a_bad_topology_is_one_line_and_status_2(tmp_path):
    proc = plan("--topology=v4-6", cache=tmp_path)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("error: --topology 'v4-6':")
