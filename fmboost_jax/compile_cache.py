"""JAX's persistent compilation cache, on by default for the command lines and `load_upsampler`.

A compiled XLA program is written to disk and read back by a later process that compiles the same
program (same code, shapes, options, devices and JAX version), which turns the minutes a large
UNet's training step or sampler takes to compile into seconds on the second run.

    compile_cache.enable()                  # $FMBOOST_COMPILE_CACHE, else the default directory
    compile_cache.enable(off=True)          # `--no_compile_cache`: leave the cache off

The directory is `$FMBOOST_COMPILE_CACHE` when set (`off`, `0`, `false`, `no` or `none` turn the
cache off), else `$XDG_CACHE_HOME/fmboost_jax/jax` (`~/.cache/fmboost_jax/jax`). A cache directory
configured otherwise (`jax.config.update("jax_compilation_cache_dir", ...)`, or
`$JAX_COMPILATION_CACHE_DIR`) is left as it is. Programs that compile in under a second are not
written (JAX's `jax_persistent_cache_min_compile_time_secs`), and neither are programs with host
callbacks: the fixed-step samplers hold none, the adaptive dopri5 (diffrax, whose runtime checks
are such) does, unless `EQX_ON_ERROR=nan` is set before equinox is imported (see
`benchmarks/compile_time.py`).
"""

from __future__ import annotations

import logging
import os

ENV_VAR = "FMBOOST_COMPILE_CACHE"
OFF_VALUES = frozenset({"off", "0", "false", "no", "none"})
_state = {"off": False}       # set by `enable(off=True)`: later calls leave the cache off

logger = logging.getLogger(__name__)


def default_dir() -> str:
    """`$XDG_CACHE_HOME/fmboost_jax/jax`, or `~/.cache/fmboost_jax/jax`."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "fmboost_jax", "jax")


def requested_dir(path: str | None = None) -> str | None:
    """The directory asked for: `path`, else `$FMBOOST_COMPILE_CACHE`, else `default_dir()`;
    None when the value is an off switch (`off`, `0`, ...)."""
    value = (os.environ.get(ENV_VAR, "") if path is None else path).strip()
    if value.lower() in OFF_VALUES:
        return None
    return os.path.abspath(os.path.expanduser(value)) if value else default_dir()


def configured_dir() -> str | None:
    """The cache directory JAX is configured with, or None."""
    import jax  # here: the command lines' --help stays fast
    return jax.config.jax_compilation_cache_dir or None


def enable(path: str | None = None, *, off: bool = False) -> str | None:
    """Turns the persistent compilation cache on (see the module docstring) and returns its
    directory, or None when it stays off.

    An already configured directory is kept (and returned). `off=True` turns the cache off for
    this process, a configured one included, and later calls (e.g. `load_upsampler` inside a
    command run with `--no_compile_cache`) leave it off. Call it before the programs to cache
    are compiled.
    """
    import jax  # here: the command lines' --help stays fast
    if off:
        _state["off"] = True
        jax.config.update("jax_enable_compilation_cache", False)
    if _state["off"]:
        return None
    if configured_dir():
        return configured_dir()
    target = requested_dir(path)
    if target is None:
        return None
    jax.config.update("jax_compilation_cache_dir", target)
    logger.info("JAX compilation cache: %s (%s=off turns it off)", target, ENV_VAR)
    return target


FLAG_HELP = (f"Do not use JAX's persistent compilation cache (default: on, in ${ENV_VAR} or "
             "~/.cache/fmboost_jax/jax).")
