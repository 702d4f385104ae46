"""Data for the data tests: a folder of real photos mixed with odd and unusable files, and
configs that read it."""

import io

import numpy as np
import skimage.data
import tiny_config
from PIL import Image

from fmboost_jax.config import load_config

PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "immunohistochemistry", "hubble_deep_field")


def _png(array, mode=None) -> bytes:
    buf = io.BytesIO()
    (Image.fromarray(array, mode) if mode else Image.fromarray(array)).save(buf, "PNG")
    return buf.getvalue()


def make_photo_folder(root):
    """Six real photos in nested folders, plus odd-but-usable and unusable files."""
    (root / "a" / "b").mkdir(parents=True)
    for i, name in enumerate(PHOTOS):
        img = getattr(skimage.data, name)()
        ext = (".jpg", ".png", ".webp")[i % 3]
        Image.fromarray(img[..., :3]).save(root / ("a" if i % 2 else "a/b") / f"{name}{ext}")
    Image.fromarray(skimage.data.camera()).save(root / "gray.png")                 # grayscale
    Image.fromarray(skimage.data.coins()).convert("CMYK").save(root / "cmyk.jpg")   # CMYK
    (root / "sixteen.png").write_bytes(_png(skimage.data.moon().astype(np.uint16) * 257))
    rgba = np.dstack([skimage.data.astronaut(), np.full((512, 512), 128, np.uint8)])
    Image.fromarray(rgba, "RGBA").save(root / "alpha.png")                          # alpha
    (root / "notes.txt").write_text("not an image, not listed")
    (root / "fake.jpg").write_bytes(b"this is not a jpeg")                           # non-image
    full = (root / "a" / "astronaut.png").read_bytes() if (root / "a" / "astronaut.png").exists() \
        else _png(skimage.data.astronaut())
    (root / "truncated.png").write_bytes(full[: len(full) // 3])                     # truncated
    Image.fromarray(skimage.data.astronaut()[:40, :40]).save(root / "tiny.png")     # too small
    return root


def config_for(path, **data):
    c = tiny_config.get_config()
    c.data.update(**{"name": "folder", "path": str(path), "num_eval_images": 2, **data})
    c.high_res_size, c.low_res_size, c.batch_size = 64, 16, 4
    return c


def lhq_smoke_config(photo_folder):
    """configs/lhq.py:smoke reading the photo folder."""
    config = load_config("lhq:smoke")
    config.data.update(name="folder", path=str(photo_folder), num_eval_images=2)
    return config
