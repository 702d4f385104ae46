"""Tests of fmboost_jax/data/builders.py: the TFDS builders."""


import numpy as np
import pytest
import skimage.data
from PIL import Image

from fmboost_jax.data import images as images_lib
from fmboost_jax.data import sources


def test_the_faceshq_builder_reads_celebahq_arrays_and_ffhq_images_losslessly(tmp_path):
    from fmboost_jax.data.prepare import prepare
    manual = tmp_path / "faceshq"
    (manual / "celebahq").mkdir(parents=True)
    (manual / "ffhq").mkdir()
    photos = {n: getattr(skimage.data, n)()[..., :3] for n in ("astronaut", "coffee", "rocket")}
    for i, img in enumerate(photos.values()):     # PGGAN's (1, 3, H, W) uint8 arrays
        np.save(manual / "celebahq" / f"imgHQ{i:05d}.npy", img.transpose(2, 0, 1)[None])
        Image.fromarray(img).save(manual / "ffhq" / f"{i:05d}.png")
    np.save(manual / "celebahq" / "imgHQ99999.npy", np.zeros((3, 8), np.float32))   # not an image
    prepare("faceshq", str(manual), str(tmp_path / "tfds"))
    train = sources.TfdsSource("faceshq", str(tmp_path / "tfds"), "train")
    val = sources.TfdsSource("faceshq", str(tmp_path / "tfds"), "validation")
    assert (len(train), len(val)) == (4, 2)        # the last file of each part validates
    originals = {f"{d}/{f}": photos[n] for i, n in enumerate(photos)
                 for d, f in (("celebahq", f"imgHQ{i:05d}.npy"), ("ffhq", f"{i:05d}.png"))}
    for src in (train, val):
        for i in range(len(src)):
            ex = src[i]
            name = ex["path"].split(":", 1)[1]
            np.testing.assert_array_equal(images_lib.decode_rgb(ex["bytes"]), originals[name])
    for f in (manual / "ffhq").iterdir():
        f.unlink()
    with pytest.raises(FileNotFoundError, match="--manual_dir: no image files .* under .*ffhq"):
        prepare("faceshq", str(manual), str(tmp_path / "tfds2"))
    (manual / "ffhq").rmdir()
    with pytest.raises(FileNotFoundError, match="--manual_dir: FacesHQ needs .*ffhq"):
        prepare("faceshq", str(manual), str(tmp_path / "tfds2"))
