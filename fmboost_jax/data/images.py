"""Decoding and cropping single images robustly: whatever a folder of photos holds.

`decode_rgb(data, path)` turns encoded bytes into a uint8 (H, W, 3) array or raises `BadImage`
naming the file and the reason. Grayscale, palette, CMYK, 16-bit and alpha images are
converted (alpha composited on white, 16-bit scaled to 8); truncated, unreadable and non-image
files are rejected. Crops: `random_crop` for training (shorter side resized to the target
size with an anti-aliased filter, then a random square and an optional horizontal flip) and
`center_crop` for evaluation; `random_crop(..., resize=False)` crops at the native resolution.
Outputs are float32 in [-1, 1].
"""

from __future__ import annotations

import io
import threading
from typing import Any

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from fmboost_jax.config import MAX_PIXELS
from fmboost_jax.errors import UserError

EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".ppm", ".gif")


class BadImage(UserError):
    """An input that is not a usable image; the message names the file and the reason."""


_PIL_LIMIT = threading.Lock()


def _open(data: bytes, path: str, max_pixels: int) -> Image.Image:
    """PIL's image of `data`, refused above `max_pixels` before it is decoded (PIL's own limit,
    a process-wide global, is replaced by this one)."""
    with _PIL_LIMIT:
        saved, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None
        try:
            img = Image.open(io.BytesIO(data))     # reads the header only
        finally:
            Image.MAX_IMAGE_PIXELS = saved
    w, h = img.size
    if w * h > max_pixels:
        raise BadImage(f"{path}: {w}x{h} = {w * h:,} pixels is above the limit of "
                       f"{max_pixels:,} (data.max_pixels / --max_pixels raise it)")
    return img


def decode_rgb(data: bytes, path: str = "<bytes>", max_pixels: int = MAX_PIXELS) -> np.ndarray:
    """Encoded image -> uint8 (H, W, 3), EXIF orientation applied; BadImage above
    `max_pixels` pixels (before decoding: no decompression bomb)."""
    try:
        img = _open(data, path, max_pixels)
        img.load()                          # a truncated file fails here
        img = ImageOps.exif_transpose(img)
    except BadImage:
        raise
    except UnidentifiedImageError:
        raise BadImage(f"{path}: not a readable image (unknown or corrupt format)") from None
    except Exception as err:               # PIL raises many types for bad files
        raise BadImage(f"{path}: not a readable image ({type(err).__name__}: {err})") from None
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):          # 16-bit or 32-bit grayscale
        a = np.asarray(img, dtype=np.float64)
        a = np.clip(a / (256.0 if a.max() > 255 else 1.0), 0, 255).astype(np.uint8)
        return np.repeat(a[..., None], 3, axis=-1)
    if img.mode == "F":
        a = np.asarray(img, dtype=np.float64)
        a = np.clip(a * (255.0 if a.max() <= 1.0 else 1.0), 0, 255).astype(np.uint8)
        return np.repeat(a[..., None], 3, axis=-1)
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(white, rgba)
    return np.asarray(img.convert("RGB"), dtype=np.uint8)


def _resize_shorter(img: np.ndarray, size: int, path: str, min_size: int) -> np.ndarray:
    h, w = img.shape[:2]
    if min(h, w) < min_size:
        raise BadImage(f"{path}: {h}x{w} is smaller than the minimum side {min_size}")
    if min(h, w) == size:
        return img
    scale = size / min(h, w)
    new = (max(size, round(w * scale)), max(size, round(h * scale)))
    return np.asarray(Image.fromarray(img).resize(new, Image.Resampling.LANCZOS, reducing_gap=None))


# The 256 float32 values of uint8 pixels in [-1, 1]. Converting by looking them up gives the same
# bits on the host (numpy) and on a device (XLA, which may fuse x / 127.5 - 1 into other ops).
_UNIT = np.arange(256, dtype=np.float32) / np.float32(127.5) - np.float32(1.0)


def to_float(img: Any) -> Any:
    """uint8 -> float32 in [-1, 1]; numpy arrays on the host, jax arrays on their device."""
    if isinstance(img, np.ndarray):
        return _UNIT[img]
    import jax.numpy as jnp
    return jnp.asarray(_UNIT)[img]


def to_uint8(images: Any) -> Any:
    """[-1, 1] -> uint8 in [0, 255], rounded and clipped; numpy or jax arrays."""
    return ((images + 1.0) * 127.5).round().clip(0, 255).astype("uint8")


def random_crop(img: np.ndarray, size: int, rng: np.random.Generator, flip: bool,
                path: str = "<image>", min_size: int = 0, resize: bool = True) -> np.ndarray:
    """(H, W, 3) uint8 -> (size, size, 3) float32 in [-1, 1]: see `random_crop_uint8`."""
    return to_float(random_crop_uint8(img, size, rng, flip, path, min_size, resize))


def random_crop_uint8(img: np.ndarray, size: int, rng: np.random.Generator, flip: bool,
                      path: str = "<image>", min_size: int = 0, resize: bool = True) -> np.ndarray:
    """(H, W, 3) uint8 -> (size, size, 3) uint8: shorter side to `size` (with `resize=False`
    only when it is smaller: crops at the native resolution), random square, random flip."""
    if resize or min(img.shape[:2]) < max(size, min_size):
        img = _resize_shorter(img, size, path, min_size)     # raises BadImage when too small
    h, w = img.shape[:2]
    y, x = rng.integers(0, h - size + 1), rng.integers(0, w - size + 1)
    crop = img[y:y + size, x:x + size]
    if flip and rng.random() < 0.5:
        crop = crop[:, ::-1]
    return np.ascontiguousarray(crop)


def center_crop(img: np.ndarray, size: int, path: str = "<image>", min_size: int = 0) -> np.ndarray:
    """(H, W, 3) uint8 -> (size, size, 3) float32: shorter side to `size`, central square."""
    img = _resize_shorter(img, size, path, min_size)
    h, w = img.shape[:2]
    y, x = (h - size) // 2, (w - size) // 2
    return to_float(img[y:y + size, x:x + size])
