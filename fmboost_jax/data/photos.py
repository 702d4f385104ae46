"""Crops of real photos that ship with scikit-image (no download needed).

The demo trains on random crops of some photos and evaluates on fixed crops of
others. Batches are a pure function of (seed, step), so a resumed run sees exactly
the batches an uninterrupted one would have seen. Images are float32 NHWC in [-1, 1].
"""

from __future__ import annotations

import functools

import numpy as np

from fmboost_jax.data.images import to_float
from fmboost_jax.errors import UserError

# Colour photos of scikit-image's gallery; grayscale ones are replicated to RGB.
PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "hubble_deep_field",
          "immunohistochemistry", "retina", "stereo_motorcycle", "camera", "brick",
          "grass", "gravel", "coins", "moon", "clock", "text", "page")


@functools.cache
def load_photo(name: str) -> np.ndarray:
    """A scikit-image photo as float32 (H, W, 3) in [-1, 1]."""
    import skimage.data
    if name not in PHOTOS:
        raise UserError(f"data.train_photos/eval_photos: unknown photo {name!r}; known: {PHOTOS}")
    img = getattr(skimage.data, name)()
    if name == "stereo_motorcycle":
        img = img[0]
    img = np.asarray(img)
    if img.ndim == 2:
        img = np.repeat(img[..., None], 3, axis=-1)
    return to_float(img[..., :3])


def _random_crop(rng: np.random.Generator, img: np.ndarray, size: int) -> np.ndarray:
    h, w = img.shape[:2]
    if h < size or w < size:
        raise UserError(f"crop size {size} exceeds a photo of {h}x{w}")
    y, x = rng.integers(0, h - size + 1), rng.integers(0, w - size + 1)
    return img[y:y + size, x:x + size]


class PhotoCrops:
    """Random training crops with horizontal flips, photos drawn in proportion to area."""

    def __init__(self, photos: tuple[str, ...], crop_size: int, batch_size: int, seed: int):
        if not photos:
            raise UserError("data.train_photos is empty: name at least one photo")
        self.images = [load_photo(p) for p in photos]
        areas = np.array([i.shape[0] * i.shape[1] for i in self.images], np.float64)
        self.probs = areas / areas.sum()
        self.crop_size, self.batch_size, self.seed = crop_size, batch_size, seed

    def batch(self, step: int) -> dict[str, np.ndarray]:
        """The batch of training step `step`: {'image': (B, S, S, 3)}."""
        rng = np.random.default_rng((self.seed, step))
        idx = rng.choice(len(self.images), size=self.batch_size, p=self.probs)
        crops = [_random_crop(rng, self.images[i], self.crop_size) for i in idx]
        flips = rng.random(self.batch_size) < 0.5
        crops = [c[:, ::-1] if f else c for c, f in zip(crops, flips)]
        return {"image": np.stack(crops)}


def eval_crops(photos: tuple[str, ...], crop_size: int, num: int, seed: int = 1234) -> np.ndarray:
    """`num` fixed crops (num, S, S, 3) spread over the held-out photos."""
    if not photos:
        raise UserError("data.eval_photos is empty: name at least one held-out photo")
    rng = np.random.default_rng(seed)
    images = [load_photo(p) for p in photos]
    return np.stack([_random_crop(rng, images[i % len(images)], crop_size) for i in range(num)])
