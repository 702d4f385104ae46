"""Cloud TPU slices by name, and their chips as compile-only devices on any machine.

    tpu_slice("v5e-16")   # TpuSlice(kind="v5e", chips=16, topology="v5e:4x4", hbm_gib=16.0)
    devices(tpu_slice("v4-8"))   # 4 abstract TPU v4 devices: jit(...).lower(...).compile()

Names are Cloud TPU accelerator types: `v4-N` and `v5p-N` count TensorCores (two per chip),
`v5litepod-N` (also `v5e-N`) and `v6e-N` count chips; a libtpu topology such as `v5e:2x2` is
taken as it is. Compiling for the devices needs `libtpu` (`pip install "jax[tpu]"`), not a TPU:
libtpu compiles for any topology from a CPU host. HBM per chip is Google's published figure.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
from typing import Any

from fmboost_jax.errors import UserError


@dataclasses.dataclass(frozen=True)
class Chip:
    libtpu_name: str        # the generation in libtpu's topology names
    hbm_gib: float          # HBM per chip
    cores_in_name: int      # TensorCores per chip counted by the accelerator type's number
    dims: int               # torus dimensions of a slice
    chip_config: str        # libtpu's chip configuration ("megacore": one device per chip)


CHIPS = {
    "v4": Chip("v4", 32.0, 2, 3, "megacore"),
    "v5p": Chip("v5", 95.0, 2, 3, "megacore"),
    "v5e": Chip("v5e", 16.0, 1, 2, "default"),
    "v6e": Chip("v6e", 32.0, 1, 2, "default"),
}
ALIASES = {"v5litepod": "v5e", "v5lite": "v5e", "v5": "v5p"}
EXAMPLES = "v4-8, v5litepod-16 (v5e-16), v5p-8, v6e-8 or a topology like v5e:2x2"


@dataclasses.dataclass(frozen=True)
class TpuSlice:
    name: str               # as given: "v5e-16"
    kind: str               # a key of CHIPS
    chips: int
    topology: str           # libtpu's name: "v5e:4x4"

    @property
    def hbm_bytes(self) -> int:
        return int(CHIPS[self.kind].hbm_gib * 2**30)


def layout(chips: int, dims: int) -> tuple[int, ...]:
    """The chip grid of a slice of `chips` chips (a power of two; 3-D slices from 4 chips):
    Cloud TPU's shapes, e.g. 16 -> (4, 4) in 2-D and (2, 2, 4) in 3-D (the smallest axis
    doubles, the last of equals first)."""
    shape = [1] * dims if dims == 2 else [2, 2, 1]
    while math.prod(shape) < chips:
        i = max(i for i, s in enumerate(shape) if s == min(shape))
        shape[i] *= 2
    return tuple(shape)


def tpu_slice(name: str) -> TpuSlice:
    """The slice of an accelerator type (`v5e-16`) or a libtpu topology (`v5e:4x4`); UserError
    naming `--topology` and the valid forms otherwise."""
    text = name.strip().lower()
    m = re.fullmatch(r"(v\d+[a-z]*)([-:])([\dx]+)", text)
    kind = m and ALIASES.get(m.group(1), m.group(1))
    if not m or kind not in CHIPS:
        raise UserError(f"--topology {name!r}: not a TPU slice; give one like {EXAMPLES}")
    chip = CHIPS[kind]
    if m.group(2) == ":":
        shape = tuple(int(s) for s in m.group(3).split("x") if s)
        if len(shape) != chip.dims or not all(shape):
            raise UserError(f"--topology {name!r}: a {kind} topology has {chip.dims} sizes, like "
                            f"{chip.libtpu_name}:{'x'.join(['2'] * chip.dims)}")
        return TpuSlice(name, kind, math.prod(shape), f"{chip.libtpu_name}:{m.group(3)}")
    number = int(m.group(3)) if m.group(3).isdigit() else 0
    chips = number // chip.cores_in_name
    smallest = 4 if chip.dims == 3 else 1
    if chips < smallest or chips & (chips - 1) or number % chip.cores_in_name:
        unit = "TensorCores, 2 per chip" if chip.cores_in_name > 1 else "chips"
        raise UserError(f"--topology {name!r}: a {kind} slice has a power of two of {unit}, at "
                        f"least {smallest * chip.cores_in_name} (e.g. {kind}-{4 * chip.cores_in_name})")
    shape = layout(chips, chip.dims)
    return TpuSlice(name, kind, chips, f"{chip.libtpu_name}:{'x'.join(map(str, shape))}")


def devices(s: TpuSlice) -> list[Any]:
    """Compile-only devices of the slice's chips (one per chip), from libtpu."""
    from jax.experimental import topologies
    try:
        import libtpu  # noqa: F401  (only to say how to install it)
    except ImportError:
        raise UserError("compiling for TPUs needs libtpu: pip install \"jax[tpu]==$(python -c "
                        "'import jax; print(jax.__version__)')\"") from None
    # Compile-only: no TPU is opened, so plans may run beside each other and beside a run
    # (libtpu otherwise allows one process per host).
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    bounds = (1, 1, 1) if s.chips < 4 else (2, 2, 1)
    desc = topologies.get_topology_desc(topology_name=s.topology, platform="tpu",
                                        chip_config_name=CHIPS[s.kind].chip_config,
                                        chips_per_host_bounds=bounds, num_slices=1)
    return list(desc.devices)


_SIZE = re.compile(r"\(([\d.]+)([KMGT])\)")
_UNITS = {"K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}


def out_of_memory(err: Exception) -> list[int]:
    """The byte figures of libtpu's "Ran out of memory" compile error (what the program needs,
    then what the chip has), or [] for another error."""
    text = str(err)
    if "RESOURCE_EXHAUSTED" not in text:
        return []
    return [int(float(v) * _UNITS[u]) for v, u in _SIZE.findall(text)]


def usable_hbm(s: TpuSlice, device: Any) -> int:
    """The HBM a program may use on one chip of `device`'s kind: libtpu's own figure (it keeps
    some for itself), read off the error of compiling a program that needs 1 TiB; the published
    capacity if libtpu says nothing."""
    import jax
    import jax.numpy as jnp
    big = jax.ShapeDtypeStruct((2**19, 2**19), jnp.bfloat16,
                               sharding=jax.sharding.SingleDeviceSharding(device))
    try:
        jax.jit(lambda x: jnp.sin(x) @ jnp.cos(x).T).lower(big).compile()
    except Exception as err:
        sizes = out_of_memory(err)
        if len(sizes) >= 2:
            return sizes[-1]
    return s.hbm_bytes
