"""The machine a benchmark ran on, in one line: every script prints it with its figures, and only
through this module.

    print(describe())          # machine: gpu:NVIDIA H100 80GB HBM3 x1 (71.2 GiB usable), cpu=...
    m = info()                 # the same as a dict (JSON), e.g. for a child process to send
    print(line(m, "UNet attention: cudnn"))            # ... with notes after the figures

`info()` holds JAX's first device (platform, kind, the memory JAX's allocator may take of it) and
their count, the host CPU and cores, the versions and `$XLA_FLAGS`; `torch_info()` the same with
the GPU as PyTorch sees it (its total memory), for a process that keeps JAX on the host.
"""

from __future__ import annotations

import os
import platform
from pathlib import Path
from typing import Any


def cpu_model() -> str:
    """The host CPU's model name (from /proc/cpuinfo on Linux)."""
    try:
        for row in Path("/proc/cpuinfo").read_text().splitlines():
            if row.startswith("model name"):
                return row.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _gib(size: float | None) -> float | None:
    return round(size / 2**30, 1) if size else None


def info(devices: bool = True) -> dict[str, Any]:
    """The machine as a dict: `platform`, `device_kind`, `devices` (count) and `memory_gib` (what
    JAX's allocator may use of the first device; None on CPUs) of JAX's devices (all None with
    `devices=False`, for a parent process that must leave the accelerator to its children),
    `cpu`, `cores`, `jax`, `python`, `xla_flags`."""
    import jax
    m: dict[str, Any] = dict(platform=None, device_kind=None, devices=None, memory_gib=None,
                             cpu=cpu_model(), cores=os.cpu_count(), jax=jax.__version__,
                             python=platform.python_version(),
                             xla_flags=os.environ.get("XLA_FLAGS", ""))
    if devices:
        d = jax.devices()[0]
        try:
            limit = (d.memory_stats() or {}).get("bytes_limit")
        except Exception:                     # not every backend keeps statistics
            limit = None
        m.update(platform=d.platform, device_kind=d.device_kind, devices=jax.device_count(),
                 memory_gib=_gib(limit))
    return m


def torch_info() -> dict[str, Any]:
    """`info()` with the GPU as PyTorch sees it (kind, count, total memory), when it sees one."""
    m = info()
    try:
        import torch
    except ImportError:
        return m
    if torch.cuda.is_available():
        m.update(platform="gpu", device_kind=torch.cuda.get_device_name(),
                 devices=torch.cuda.device_count(),
                 memory_gib=_gib(torch.cuda.get_device_properties(0).total_memory))
    return m


def line(m: dict[str, Any], *notes: str) -> str:
    """`machine: PLATFORM:KIND xCOUNT (N GiB usable), cpu='MODEL' cores=N, jax V, python V`, then
    `XLA_FLAGS` when set and the `notes`, separated by "; "."""
    head = "machine: "
    if m.get("device_kind"):
        memory = f" ({m['memory_gib']:g} GiB usable)" if m.get("memory_gib") else ""
        head += f"{m['platform']}:{m['device_kind']} x{m['devices']}{memory}, "
    text = (f"{head}cpu='{m['cpu']}' cores={m['cores']}, jax {m['jax']}, "
            f"python {m['python']}")
    if m.get("xla_flags"):
        text += f", XLA_FLAGS='{m['xla_flags']}'"
    return "; ".join((text, *notes))


def describe(devices: bool = True, *notes: str) -> str:
    """`line(info(devices), *notes)`: the line every benchmark prints."""
    return line(info(devices), *notes)
