"""Tests of fmboost_jax/compile_cache.py: where the cache goes, the off switches, and that a
configured cache directory is never replaced (no compilation)."""


import jax
import pytest

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


def test_upsample_command_has_the_off_flag():
    from fmboost_jax.upsample import build_parser
    args = ["--model", "m", "--input", "i", "--output", "o"]
    assert not build_parser().parse_args(args).no_compile_cache
    assert build_parser().parse_args([*args, "--no_compile_cache"]).no_compile_cache
