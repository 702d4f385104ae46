"""The machine a benchmark ran on, in one line: every script prints it with its figures."""

from __future__ import annotations

import os
import platform
from pathlib import Path


def cpu_model() -> str:
    """The host CPU's model name (from /proc/cpuinfo on Linux)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def describe(devices: bool = True) -> str:
    """`machine: ...`: JAX's first device and their count (not with `devices=False`, for a
    parent process that must leave the accelerator to its children), the host CPU and cores,
    the versions."""
    import jax
    host = (f"cpu='{cpu_model()}' cores={os.cpu_count()}, jax {jax.__version__}, "
            f"python {platform.python_version()}")
    if not devices:
        return f"machine: {host}"
    device = jax.devices()[0]
    return f"machine: {device.platform}:{device.device_kind} x{jax.device_count()}, {host}"
