"""Whether a compiled boost fits the memory of its devices, decided before it runs.

XLA states what a compiled program needs per device beyond its inputs (temporaries and
outputs); the device states what it has free (accelerators: `memory_stats()`'s limit minus what
is in use, parameters included; CPUs: the host's available memory). A boost that does not fit is
refused with both figures and the batch size that would fit, instead of failing half-way with an
allocator error or swapping the host to a halt.
"""

from __future__ import annotations

import os
from typing import Any

import jax

from fmboost_jax.errors import UserError

GiB = 2.0 ** 30
HEADROOM = 0.9            # use at most this fraction of what is free


class TooLarge(UserError):
    """A boost whose estimated memory exceeds what the device has; the message says what fits."""


def available_bytes(device: jax.Device) -> int:
    """Free memory of `device` in bytes (the host's available memory for a CPU device)."""
    stats = device.memory_stats() if hasattr(device, "memory_stats") else None
    if stats and "bytes_limit" in stats:
        return int(stats["bytes_limit"] - stats.get("bytes_in_use", 0))
    return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))


def required_bytes(compiled: Any) -> int:
    """Memory a compiled program allocates per device beyond its (resident) arguments."""
    m = compiled.memory_analysis()
    return int(m.temp_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes)


def check_fits(compiled: Any, batch: int, devices: int, limit: int | None = None) -> None:
    """Raises TooLarge if `compiled`, run on `batch` images per device over `devices` devices,
    needs more than HEADROOM of `limit` bytes per device (None: what the first device has)."""
    have = HEADROOM * (available_bytes(jax.local_devices()[0]) if limit is None else limit)
    need = required_bytes(compiled)
    if need <= have:
        return
    fit = int(have // (need / batch))        # temporaries grow with the batch
    advice = (f"a batch of at most {fit * devices} fits" if fit >= 1 else
              "even one image does not fit: code the VAE in tiles "
              "(config.first_stage.tile_size=1024) or boost a smaller input")
    raise TooLarge(f"this boost needs about {_size(need)} per device but {_size(have)} are "
                   f"free ({batch * devices} images over {devices} device(s)); {advice}")


def _size(n: float) -> str:
    return f"{n / GiB:.2f} GiB" if n >= GiB / 4 else f"{n / 2 ** 20:.0f} MiB"
