"""Tiled application of a convolutional network to inputs too large to process at once.

`tiled_apply(fn, x, tile, overlap, scale)` cuts `x` (B, H, W, C) into windows of at most `tile` x
`tile` that overlap by `overlap` pixels (as few as `tile` allows, each no larger than that number
needs: `window_side`), applies `fn` to one window at a time (a `lax.fori_loop`, so peak
memory is one window's activations plus the output), and blends the outputs: every output pixel
is the weighted mean of the windows covering it, with weights that ramp linearly from the edge of
a window to `overlap * scale` pixels inside it. Neighbouring windows thus hand over smoothly
instead of meeting at a seam. Used for the VAE at 2048² and above.

Weights: along a side shared with a neighbour, a window's weight is 0 over the outer quarter of
the overlap (where its padding shows), rises linearly across the middle half, and is 1 beyond;
sides on the image border keep weight 1. For a network whose receptive field reaches less than
a quarter of the overlap, tiled and whole outputs are therefore identical. Networks with global
statistics (the VAE's GroupNorms) would see per-window statistics; `tiled_mean` averages such
statistics over the same windows (or a checkerboard half of them) so that all windows can share
them.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array


class TileOptions(NamedTuple):
    """Tiled coding of images larger than `size` pixels: tiles of `size` overlapping by `overlap`,
    normalised with the image's estimated statistics when `shared_stats` (`config.first_stage`'s
    `tile_size`, `tile_overlap`, `tile_shared_stats`)."""
    size: int
    overlap: int
    shared_stats: bool


def tile_starts(size: int, tile: int, overlap: int, align: int = 1) -> list[int]:
    """Start offsets (multiples of `align`) of windows of `tile` covering [0, size), neighbours
    sharing at least about `overlap`."""
    if tile >= size:
        return [0]
    if not 0 <= overlap < tile:
        raise ValueError(f"tile overlap must be in [0, tile={tile}), got {overlap}")
    if (size - tile) % align:
        raise ValueError(f"size {size} - tile {tile} is not a multiple of {align}")
    stride = tile - overlap
    n = -(-(size - tile) // stride) + 1
    # Spread the windows evenly; the last one ends at `size`.
    return [align * int(round(i * (size - tile) / (n - 1) / align)) for i in range(n)]


def blend_ramps(length: int, overlap: int) -> tuple[np.ndarray, np.ndarray]:
    """(rise, fall), each (length,): the weights near a window's start and end edges."""
    i = np.arange(length, dtype=np.float32) + 0.5
    margin = overlap / 4
    width = max(overlap - 2 * margin, 1e-6)
    rise = np.clip((i - margin) / width, 0.0, 1.0)
    return rise, rise[::-1].copy()


def window_side(size: int, tile: int, overlap: int, align: int = 1) -> int:
    """The side of the windows that cover [0, size): the smallest multiple of `align` with which
    as many windows as `tile` needs still overlap by about `overlap` (at most `tile`). At 2048 px
    in 1024-px tiles overlapping by 64, three 728-px windows a side instead of three of 1024 px:
    half the pixels coded."""
    if tile >= size:
        return size
    n = len(tile_starts(size, tile, overlap, align))
    side = -(-(size + (n - 1) * overlap) // n)
    return min(tile, -(-side // align) * align)


def windows(x: Array, tile: int, overlap: int, align: int = 1
            ) -> tuple[np.ndarray, tuple[int, int]]:
    """The windows that `tiled_apply` cuts from `x` (B, H, W, C): (N, 2) top-left corners (y, x)
    and their (height, width), each side `window_side`."""
    h, w = x.shape[1:3]
    th, tw = window_side(h, tile, overlap, align), window_side(w, tile, overlap, align)
    return _corners(h, w, th, tw, overlap, align), (th, tw)


def window_starts(x: Array, tile: int, overlap: int, align: int = 1) -> np.ndarray:
    """(N, 2) top-left corners (y, x) of `tile` x `tile` windows (at most the image's sides) that
    cover `x` (B, H, W, C), neighbours overlapping by at least about `overlap`. Windows of the
    given size, not `window_side`'s: boosts in tiles (`inference/tiles.py`) use a size the network
    was checked to take."""
    h, w = x.shape[1:3]
    return _corners(h, w, min(tile, h), min(tile, w), overlap, align)


def _corners(h: int, w: int, th: int, tw: int, overlap: int, align: int) -> np.ndarray:
    ys, xs = tile_starts(h, th, overlap, align), tile_starts(w, tw, overlap, align)
    return np.array([(y, x_) for y in ys for x_ in xs], np.int32)


def checkerboard(starts: np.ndarray) -> np.ndarray:
    """The windows of `starts` (N, 2) on the white squares of a checkerboard over their grid
    (row + column even): corners and centre of a 3 x 3 grid, ceil(N / 2) of N windows, evenly
    spread over the image. Measured at 256² and 384² (3 x 3 and 4 x 4 windows), their mean
    statistics code within about 10% as close to whole-image coding as all windows' do
    (docs/training.md, The Stable Diffusion VAE)."""
    rows = np.searchsorted(np.unique(starts[:, 0]), starts[:, 0])
    cols = np.searchsorted(np.unique(starts[:, 1]), starts[:, 1])
    return starts[(rows + cols) % 2 == 0]


def tiled_mean(fn: Callable[[Array], Any], x: Array, tile: int, overlap: int,
               align: int = 1, every_other: bool = False) -> Any:
    """The mean over the windows of `x` that `tiled_apply` uses of `fn(window)`, a pytree of
    arrays; one window at a time. (Statistics shared by all windows, e.g. GroupNorm's.) With
    `every_other`, over the `checkerboard` half of them (about half the work)."""
    b, h, w, c = x.shape
    starts, (th, tw) = windows(x, tile, overlap, align)
    if every_other:
        starts = checkerboard(starts)
    window = lambda i: jax.lax.dynamic_slice(x, (0, starts[i, 0], starts[i, 1], 0), (b, th, tw, c))
    starts = jnp.asarray(starts)
    first = fn(window(0))
    if starts.shape[0] == 1:
        return first
    total = jax.lax.fori_loop(1, starts.shape[0], lambda i, acc: jax.tree.map(
        jnp.add, acc, fn(window(i))), first)
    return jax.tree.map(lambda t: t / starts.shape[0], total)


def tiled_apply(fn: Callable[[Array], Array], x: Array, tile: int, overlap: int,
                scale: float, out_channels: int) -> Array:
    """`fn` applied to overlapping windows of `x` (B, H, W, C) -> (B, H*scale, W*scale, out).

    `fn` maps a window (B, th, tw, C) to (B, th*scale, tw*scale, out_channels); `scale` is 8 for
    a VAE decoder and 1/8 for its encoder. Inputs no larger than `tile` go through `fn` whole.
    """
    b, h, w, _ = x.shape
    if h <= tile and w <= tile:
        return fn(x)
    align = max(1, int(round(1 / scale)))  # windows of an encoder start on whole latent cells
    starts, (th, tw) = windows(x, tile, overlap, align)
    oh, ow = int(round(th * scale)), int(round(tw * scale))
    ramps_y, ramps_x = blend_ramps(oh, overlap * scale), blend_ramps(ow, overlap * scale)
    out_shape = (b, int(round(h * scale)), int(round(w * scale)), out_channels)

    def body(i, carry):
        acc, norm = carry
        y0, x0 = starts[i, 0], starts[i, 1]
        window = jax.lax.dynamic_slice(x, (0, y0, x0, 0), (b, th, tw, x.shape[-1]))
        oy = (y0 * oh) // th   # exact: starts and tile sizes scale by the same factor
        ox = (x0 * ow) // tw
        side = lambda ramps, start, n, total: jnp.minimum(      # 1 on the image's own border
            jnp.where(start == 0, 1.0, ramps[0]), jnp.where(start + n == total, 1.0, ramps[1]))
        weight = (side(ramps_y, oy, oh, out_shape[1])[:, None] *
                  side(ramps_x, ox, ow, out_shape[2])[None, :])[None, :, :, None]
        y = fn(window).astype(jnp.float32) * weight
        acc = jax.lax.dynamic_update_slice(
            acc, jax.lax.dynamic_slice(acc, (0, oy, ox, 0), y.shape) + y, (0, oy, ox, 0))
        wsum = jax.lax.dynamic_slice(norm, (0, oy, ox, 0), (1, oh, ow, 1)) + weight
        norm = jax.lax.dynamic_update_slice(norm, wsum, (0, oy, ox, 0))
        return acc, norm

    starts = jnp.asarray(starts)
    acc = jnp.zeros(out_shape, jnp.float32)
    norm = jnp.zeros((1, *out_shape[1:3], 1), jnp.float32)
    acc, norm = jax.lax.fori_loop(0, starts.shape[0], body, (acc, norm))
    return acc / norm
