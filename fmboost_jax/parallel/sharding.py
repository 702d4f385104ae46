"""Device mesh and shardings, declared in the config and applied here.

`config.mesh` names the mesh axes and their sizes, big_vision style:
`(("data", -1), ("fsdp", 1))` is pure data parallelism over every device; `(("data", 2),
("fsdp", 4))` shards parameters, EMA and optimizer state over groups of 4 devices (FSDP) and
replicates them across the 2 groups. A size of -1 takes the devices the other axes leave.
The batch is always split over all devices (both axes). Arrays smaller than
`config.fsdp_min_size` elements stay replicated: sharding them saves no memory worth a collective.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from fmboost_jax.errors import ConfigError

PyTree = Any
DATA_AXES = ("data", "fsdp")     # the batch dimension is split over both


def _check_axes(axes: Sequence[tuple[str, int]]) -> list[int]:
    """The sizes of `config.mesh`'s (name, size) pairs, if the names and sizes are valid."""
    names = [name for name, _ in axes]
    if sorted(names) != sorted(DATA_AXES):
        raise ValueError(f"config.mesh: axes must be {DATA_AXES} (in any order), got {names}")
    sizes = [int(size) for _, size in axes]
    if sum(s == -1 for s in sizes) > 1 or any(s == 0 or s < -1 for s in sizes):
        raise ValueError(f"config.mesh: sizes must be positive with at most one -1, got {sizes}")
    return sizes


def check_config(config: Any) -> None:
    """The rules of `config.mesh` that hold on any machine (its fit is checked at start-up)."""
    try:
        _check_axes(config.mesh)
    except (ValueError, TypeError) as e:
        raise ConfigError("mesh", str(e).removeprefix("config.mesh: ")) from None


def check_devices(config: Any, num_devices: int | None = None) -> None:
    """`config.mesh` fits the devices of this run (or `num_devices`, e.g. a whole pod slice seen
    from one of its hosts) and `config.batch_size` splits over them; ConfigError naming the field
    otherwise."""
    n = num_devices or jax.device_count()
    try:
        mesh_shape(config.mesh, n)
    except ValueError as e:
        raise ConfigError("mesh", str(e).removeprefix("config.mesh: ")) from None
    if config.batch_size % n:
        where = f"{n} devices" if num_devices else f"{n} devices ({jax.process_count()} processes)"
        raise ConfigError("batch_size", f"{config.batch_size} is not divisible by the {where} it "
                          "is split over")


def mesh_shape(axes: Sequence[tuple[str, int]], num_devices: int) -> tuple[int, ...]:
    """Resolves the (name, size) pairs of `config.mesh` (one size may be -1) for `num_devices`."""
    sizes = _check_axes(axes)
    free = [i for i, s in enumerate(sizes) if s == -1]
    fixed = math.prod(s for s in sizes if s != -1)
    if free:
        if num_devices % fixed:
            raise ValueError(f"config.mesh: {num_devices} devices are not divisible by the fixed "
                             f"axis sizes (product {fixed}) of {tuple(axes)}")
        sizes[free[0]] = num_devices // fixed
    if math.prod(sizes) != num_devices:
        raise ValueError(f"config.mesh: {tuple(axes)} needs {math.prod(sizes)} devices, "
                         f"but {num_devices} are available")
    return tuple(sizes)


def make_mesh(axes: Sequence[tuple[str, int]], devices: Sequence[jax.Device] | None = None) -> Mesh:
    """The mesh of `config.mesh` over `devices` (default: all devices of all processes)."""
    devices = list(jax.devices() if devices is None else devices)
    shape = mesh_shape(axes, len(devices))
    names = tuple(name for name, _ in axes)
    return jax.make_mesh(shape, names, axis_types=(AxisType.Auto,) * len(names), devices=devices)


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) dimension split over every device of the mesh."""
    return NamedSharding(mesh, P(DATA_AXES))


def fsdp_spec(shape: Sequence[int], fsdp_size: int, min_size: int) -> P:
    """Shards the largest dimension divisible by `fsdp_size` over 'fsdp' (ties: the last one)."""
    if fsdp_size <= 1 or math.prod(shape) < min_size:
        return P()
    candidates = [(d, i) for i, d in enumerate(shape) if d % fsdp_size == 0]
    if not candidates:
        return P()
    _, axis = max(candidates)
    spec = [None] * len(shape)
    spec[axis] = "fsdp"
    return P(*spec)


def state_shardings(abstract_tree: PyTree, mesh: Mesh, min_size: int) -> PyTree:
    """NamedShardings for a pytree of arrays (or ShapeDtypeStructs): FSDP over 'fsdp' for big
    arrays, replicated otherwise."""
    fsdp_size = mesh.shape["fsdp"]
    return jax.tree.map(lambda x: NamedSharding(mesh, fsdp_spec(x.shape, fsdp_size, min_size)),
                        abstract_tree)


def global_batch(local_batch: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """This process's part of the batch -> global arrays split over all devices.

    Every process passes `global_batch_size // process_count` examples; the global batch is
    their concatenation in process order.
    """
    sharding = batch_sharding(mesh)
    return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
            for k, v in local_batch.items()}


def put_replicated(tree: PyTree, mesh: Mesh) -> PyTree:
    """Host values (identical on every process) -> arrays replicated over the mesh."""
    sharding = replicated(mesh)
    return jax.tree.map(
        lambda x: jax.make_array_from_callback(np.shape(x), sharding, lambda idx: np.asarray(x)[idx]),
        tree)


def put_batch(images: np.ndarray, mesh: Mesh) -> jax.Array:
    """A host array identical on every process (e.g. the eval set) -> a global array split
    over the devices along its first axis, padded with copies of its last row to a multiple of
    the device count (the first `len(images)` rows are the images)."""
    pad = -images.shape[0] % mesh.size
    if pad:
        images = np.concatenate([images, np.repeat(images[-1:], pad, axis=0)])
    return jax.make_array_from_callback(images.shape, batch_sharding(mesh),
                                        lambda idx: images[idx])
