"""Boosting an image larger than one call should take: overlapping tiles of the low-res input,
each boosted on its own, blended where they overlap.

    images, nfe, compile_s = boost_in_tiles(up, lowres, tile=128, overlap=16, rng=key,
                                            solver="euler")

The windows and the blend are `first_stage.tiling`'s (windows of `tile` low-res pixels sharing
about `overlap`; weights ramping across the middle half of each overlap, 1 on the image's own
border), so no seam shows where two tiles meet. Every window has the same size, so one compiled
program boosts them all, one at a time from the host: memory stays at one tile's, and
`progress(i, n)` counts the tiles. Tile i draws its noise from `fold_in(rng, i)`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import numpy as np

from fmboost_jax.first_stage import tiling


def tile_count(h: int, w: int, tile: int, overlap: int) -> int:
    """How many tiles an (h, w) input takes (1 when it is no larger than `tile`)."""
    return len(tiling.window_starts(np.zeros((1, h, w, 1)), tile, overlap))


def boost_in_tiles(model: Any, lowres: np.ndarray, tile: int, overlap: int, rng: Any,
                   progress: Callable[[int, int], None] | None = None, **sampler: Any
                   ) -> tuple[np.ndarray, int, float]:
    """Low-res images (B, h, w, 3) in [-1, 1] -> (the blended boost (B, H, W, 3), the most NFE
    of a tile, the seconds spent compiling (`model.compile_seconds` of each call)); inputs no larger
    than `tile` are boosted whole."""
    b, h, w, _ = lowres.shape
    u = model.upscale
    starts = tiling.window_starts(lowres, tile, overlap)
    th, tw = min(tile, h), min(tile, w)
    ramps_y = tiling.blend_ramps(th * u, overlap * u)
    ramps_x = tiling.blend_ramps(tw * u, overlap * u)
    acc = np.zeros((b, h * u, w * u, 3), np.float32)
    norm = np.zeros((1, h * u, w * u, 1), np.float32)
    nfe, compile_s = 0, 0.0
    for i, (y, x) in enumerate(starts):
        if progress:
            progress(i, len(starts))
        key = None if rng is None else jax.random.fold_in(rng, i)
        out = model(lowres[:, y:y + th, x:x + tw], key, **sampler)
        nfe = max(nfe, int(np.max(out.stats.get("nfe", 1))))
        compile_s += getattr(model, "compile_seconds", 0.0)
        weight = (_side(ramps_y, y, th, h)[:, None] * _side(ramps_x, x, tw, w)[None, :])
        weight = weight[None, :, :, None]
        oy, ox = y * u, x * u
        acc[:, oy:oy + th * u, ox:ox + tw * u] += np.asarray(out.images, np.float32) * weight
        norm[:, oy:oy + th * u, ox:ox + tw * u] += weight
    return acc / norm, nfe, compile_s


def _side(ramps: tuple[np.ndarray, np.ndarray], start: int, n: int, total: int) -> np.ndarray:
    """A window's weights along one axis: the ramps where it meets a neighbour, 1 at the
    image's own border."""
    rise = np.ones_like(ramps[0]) if start == 0 else ramps[0]
    fall = np.ones_like(ramps[1]) if start + n == total else ramps[1]
    return np.minimum(rise, fall)
