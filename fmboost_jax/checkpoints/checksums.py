"""Checksums of array pytrees, computed on the devices that hold the arrays.

Orbax's files carry no checksum of the array data, so one flipped byte restores silently. Every
saved array gets two 32-bit sums of its bit patterns: the plain sum and the sum weighted by the
odd number 2i + 1 at position i (both modulo 2^32). A flipped bit k of word i changes the first by
±2^k and the second by ±2^k (2i + 1), never 0 modulo 2^32, so every single flip is caught, and
the position weights catch swapped or shifted blocks. One jitted reduction computes them for
sharded arrays too; only the sums travel to the host.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

PyTree = Any


def _words(x: jax.Array) -> jax.Array:
    """The bit pattern of `x` as uint32, in `x`'s shape (8-byte items: a trailing axis of 2)."""
    if x.dtype == jnp.bool_:
        return x.astype(jnp.uint32)
    size = jnp.dtype(x.dtype).itemsize
    if size == 8:
        return jax.lax.bitcast_convert_type(x, jnp.uint32)
    unsigned = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32}[size]
    return jax.lax.bitcast_convert_type(x, unsigned).astype(jnp.uint32)


def _positions(shape: tuple[int, ...]) -> jax.Array:
    """The row-major position of every element, as uint32 in `shape`: built from iotas along each
    axis, so a sharded array is never reshaped (or gathered) to compute it."""
    position, stride = jnp.zeros(shape, jnp.uint32), 1
    for axis in reversed(range(len(shape))):
        iota = jax.lax.broadcasted_iota(jnp.uint32, shape, axis)
        position = position + iota * jnp.uint32(stride % 2 ** 32)
        stride *= shape[axis]
    return position


def _sums(x: jax.Array) -> jax.Array:
    """uint32[2]: the plain and the position-weighted sum of `x`'s words."""
    w = _words(x)
    odd = _positions(w.shape) * jnp.uint32(2) + jnp.uint32(1)
    return jnp.stack([jnp.sum(w, dtype=jnp.uint32), jnp.sum(w * odd, dtype=jnp.uint32)])


_tree_sums = jax.jit(lambda tree: jax.tree.map(_sums, tree))


def leaf_name(path: tuple[Any, ...]) -> str:
    """"params/down_0/kernel": the same for a dataclass, a namedtuple and the dict Orbax
    restores them as."""
    part = lambda k: getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))
    return "/".join(str(part(k)) for k in path)


def compute(tree: PyTree) -> dict[str, list[int]]:
    """{leaf name: [plain sum, weighted sum]} of every array leaf of `tree` (JSON-ready)."""
    sums = jax.device_get(_tree_sums(tree))
    return {leaf_name(path): [int(v) for v in np.asarray(s)]
            for path, s in jax.tree_util.tree_leaves_with_path(sums)}


def mismatches(expected: dict[str, list[int]], tree: PyTree) -> list[str]:
    """The leaf paths of `tree` whose sums differ from `expected` (or are missing from it)."""
    actual = compute(tree)
    wrong = [k for k, v in actual.items() if expected.get(k) != v]
    return wrong + [k for k in expected if k not in actual]
