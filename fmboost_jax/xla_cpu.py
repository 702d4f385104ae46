"""XLA's CPU backend set up for this UNet: the one CPU-only speed switch.

XLA's CPU compiler hands convolutions and element-wise fusions to YNNPACK by default (jaxlib
0.10). For the UNet's 3x3 convolutions with 64-192 channels that is 1.8-2.4x slower than XLA's own
convolution kernels, forward and backward (measured alone; the whole ref15m training step 1.32x,
README's Benchmarks), so `FLAGS` keep them out of YNNPACK. The flags only change which CPU kernels
run convolutions and element-wise fusions: outputs agree to float32 rounding
(tests/test_xla_cpu.py), and GPU and TPU programs are untouched.

`configure()` adds `FLAGS` to `$XLA_FLAGS`; `import fmboost_jax` calls it, so every command line,
notebook and benchmark gets them. XLA reads `$XLA_FLAGS` once, when JAX first initialises its
backends, so importing fmboost_jax after a JAX computation has run leaves this process as it is.
`FMBOOST_XLA_CPU=off` (or `0`, `false`, `no`, `none`) turns the switch off; a `$XLA_FLAGS` that
already sets a flag's name keeps the user's value. Hosts with a GPU or TPU plugin installed
(`ACCELERATOR_PACKAGES`) are left alone unless `$JAX_PLATFORMS` is `cpu`: their XLA builds parse
`$XLA_FLAGS` too, and the switch only matters where the UNet runs on the CPU.
"""

from __future__ import annotations

import os
import sys
from importlib import metadata

ENV_VAR = "FMBOOST_XLA_CPU"
OFF_VALUES = frozenset({"off", "0", "false", "no", "none"})
FLAGS = ("--xla_cpu_experimental_ynn_fusion_type=-individual_convolution,-eltwise",)
MIN_JAXLIB = (0, 9)  # the first jaxlib that knows these flags (an unknown flag aborts XLA)
ACCELERATOR_PACKAGES = ("libtpu", "libtpu-nightly", "jax-cuda12-plugin", "jax-cuda13-plugin",
                        "jax-rocm6-plugin", "jax-rocm7-plugin")


def _jaxlib_version() -> tuple[int, ...]:
    try:
        return tuple(int(p) for p in metadata.version("jaxlib").split(".")[:2])
    except (metadata.PackageNotFoundError, ValueError):
        return (0,)


def _accelerator_installed() -> bool:
    for name in ACCELERATOR_PACKAGES:
        try:
            metadata.version(name)
            return True
        except metadata.PackageNotFoundError:
            pass
    return False


def _backends_initialized() -> bool:
    if "jax" not in sys.modules:
        return False
    try:
        from jax._src import xla_bridge
        return bool(xla_bridge.backends_are_initialized())
    except (ImportError, AttributeError):
        return False


def flags_to_add(environ: dict[str, str], jaxlib_version: tuple[int, ...],
                 accelerator: bool = False) -> list[str]:
    """The entries of `FLAGS` that `configure` would append to `environ["XLA_FLAGS"]`;
    `accelerator`: a GPU or TPU plugin is installed."""
    if environ.get(ENV_VAR, "").strip().lower() in OFF_VALUES or jaxlib_version < MIN_JAXLIB:
        return []
    if accelerator and environ.get("JAX_PLATFORMS", "").strip().lower() != "cpu":
        return []
    present = environ.get("XLA_FLAGS", "")
    return [f for f in FLAGS if f.split("=", 1)[0] not in present]


def configure() -> list[str]:
    """Appends the CPU flags to `$XLA_FLAGS` (see the module docstring); returns those added."""
    if _backends_initialized():
        return []
    added = flags_to_add(dict(os.environ), _jaxlib_version(), _accelerator_installed())
    if added:
        os.environ["XLA_FLAGS"] = " ".join([os.environ.get("XLA_FLAGS", "").strip(), *added]).strip()
    return added
