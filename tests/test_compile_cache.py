"""Tests of fmboost_jax/compile_cache.py: where the cache goes, the off switches, that a
configured cache directory is never replaced (no compilation), and which samplers it stores."""

import os
import subprocess
import sys

import jax
import pytest
from support import ROOT

from fmboost_jax import compile_cache


@pytest.fixture
def unconfigured(monkeypatch, tmp_path):
    """No cache directory configured (the tests' own is restored afterwards), no env var, and
    the user's cache directory under `tmp_path`."""
    saved = jax.config.jax_compilation_cache_dir
    jax.config.update("jax_compilation_cache_dir", None)
    monkeypatch.delenv(compile_cache.ENV_VAR, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.setitem(compile_cache._state, "off", False)
    yield tmp_path
    jax.config.update("jax_compilation_cache_dir", saved)
    jax.config.update("jax_enable_compilation_cache", True)


def test_default_is_the_users_cache_directory(unconfigured):
    expected = str(unconfigured / "xdg" / "fmboost_jax" / "jax")
    assert compile_cache.enable() == expected
    assert jax.config.jax_compilation_cache_dir == expected


def test_without_xdg_cache_home_it_is_under_home(unconfigured, monkeypatch):
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(unconfigured / "home"))
    assert compile_cache.default_dir() == str(unconfigured / "home" / ".cache" / "fmboost_jax"
                                              / "jax")


def test_env_var_chooses_the_directory(unconfigured, monkeypatch):
    monkeypatch.setenv(compile_cache.ENV_VAR, str(unconfigured / "mine"))
    assert compile_cache.enable() == str(unconfigured / "mine")
    assert jax.config.jax_compilation_cache_dir == str(unconfigured / "mine")


@pytest.mark.parametrize("value", ["off", "OFF", "0", "false", "no", "none"])
def test_env_var_turns_it_off(unconfigured, monkeypatch, value):
    monkeypatch.setenv(compile_cache.ENV_VAR, value)
    assert compile_cache.enable() is None
    assert jax.config.jax_compilation_cache_dir is None


def test_off_flag_keeps_it_off_for_later_calls(unconfigured):
    assert compile_cache.enable(off=True) is None
    assert compile_cache.enable() is None            # e.g. load_upsampler inside the command
    assert jax.config.jax_compilation_cache_dir is None


def test_explicit_path_and_user_home(unconfigured, monkeypatch):
    monkeypatch.setenv("HOME", str(unconfigured / "home"))
    assert compile_cache.requested_dir("~/jaxcache") == str(unconfigured / "home" / "jaxcache")
    assert compile_cache.requested_dir("off") is None


def test_a_configured_directory_is_not_replaced(unconfigured, monkeypatch):
    jax.config.update("jax_compilation_cache_dir", str(unconfigured / "configured"))
    monkeypatch.setenv(compile_cache.ENV_VAR, str(unconfigured / "other"))
    assert compile_cache.enable() == str(unconfigured / "configured")
    assert compile_cache.enable(str(unconfigured / "explicit")) == str(unconfigured / "configured")
    assert jax.config.jax_compilation_cache_dir == str(unconfigured / "configured")


def test_off_also_turns_a_configured_cache_off(unconfigured):
    jax.config.update("jax_compilation_cache_dir", str(unconfigured / "configured"))
    assert compile_cache.enable(off=True) is None
    assert not jax.config.jax_enable_compilation_cache
    assert compile_cache.enable() is None


def test_upsample_and_evaluate_commands_have_the_off_flag():
    from fmboost_jax import evaluate, upsample
    for parser, args in ((upsample.build_parser(), ["--model", "m", "--input", "i", "--output", "o"]),
                         (evaluate.build_parser(), ["--model", "m"])):
        assert not parser.parse_args(args).no_compile_cache
        assert parser.parse_args([*args, "--no_compile_cache"]).no_compile_cache


# Compiles the tiny config's sampler with argv[1] as the solver in a fresh process whose cache
# is argv[2] (the command lines' set-up, every program stored however fast it compiles).
SAMPLER = r"""
import sys
import jax
sys.path.insert(0, "tests")
import support
from fmboost_jax import compile_cache
from fmboost_jax.cfm import sampling
from fmboost_jax.cfm.model import CFM
compile_cache.enable(sys.argv[2])
c = support.tiny_pixel_config()
cfm = CFM.from_config(c)
params = jax.jit(cfm.init_params)(jax.random.PRNGKey(0))
low = jax.numpy.zeros((1, c.low_res_size, c.low_res_size, 3))
fn = sampling.make_sample_fn(cfm, solver=sys.argv[1], num_steps=2)
jax.block_until_ready(fn(params, {}, low, jax.random.PRNGKey(1)).images)
"""


@pytest.mark.parametrize("solver, stored", [("euler", True), ("dopri5", False)])
def test_the_fixed_step_samplers_are_stored_and_diffraxs_dopri5_is_not(solver, stored, tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("JAX_")}
    env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
    proc = subprocess.run([sys.executable, "-c", SAMPLER, solver, str(tmp_path)], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    entries = [f for f in os.listdir(tmp_path) if f.startswith("jit_sample-")]
    assert len(entries) == (1 if stored else 0), (solver, sorted(os.listdir(tmp_path)))
