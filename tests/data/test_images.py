"""Tests of fmboost_jax/data/images.py: decoding odd files and crops."""


import numpy as np
import pytest
import skimage.data

from fmboost_jax.data import images as images_lib


def test_odd_images_are_converted_and_bad_ones_rejected_with_their_path(photo_folder):
    read = lambda name: images_lib.decode_rgb((photo_folder / name).read_bytes(), name)
    for name in ("gray.png", "cmyk.jpg", "sixteen.png", "alpha.png"):
        img = read(name)
        assert img.dtype == np.uint8 and img.ndim == 3 and img.shape[2] == 3, name
    assert abs(int(read("sixteen.png").astype(int).max()) - int(skimage.data.moon().max())) <= 1
    alpha = read("alpha.png").astype(int)      # composited on white at 50% opacity
    expected = (skimage.data.astronaut().astype(int) * 128 + 255 * 127) // 255
    assert np.abs(alpha - expected).max() <= 2
    for name in ("fake.jpg", "truncated.png"):
        with pytest.raises(images_lib.BadImage, match=name):
            read(name)
    with pytest.raises(images_lib.BadImage, match="tiny.png: 40x40 is smaller than"):
        images_lib.center_crop(read("tiny.png"), 64, "tiny.png", min_size=64)


def test_native_crops_are_exact_windows_and_resized_crops_see_the_whole_photo():
    yy, xx = np.mgrid[:300, :700]
    img = np.stack([yy % 256, xx % 256, (yy // 256) * 16 + xx // 256], -1).astype(np.uint8)
    rng = np.random.default_rng(0)
    for _ in range(5):
        crop = np.round((images_lib.random_crop(img, 64, rng, False, resize=False) + 1) * 127.5)
        r, g, b = crop[0, 0].astype(int)
        y, x = (b // 16) * 256 + r, (b % 16) * 256 + g
        np.testing.assert_array_equal(crop, img[y:y + 64, x:x + 64])
    # "resize": the shorter side (300) becomes 64, so a crop spans all rows of the photo.
    ramp = np.repeat((yy * 255 // 299).astype(np.uint8)[..., None], 3, -1)
    crop = np.round((images_lib.random_crop(ramp, 64, rng, False) + 1) * 127.5)
    assert crop[0, 0, 0] < 5 and crop[-1, 0, 0] > 250
    small = images_lib.random_crop(img[:40, :50], 64, rng, True, resize=False)   # up-sized
    assert small.shape == (64, 64, 3)
    with pytest.raises(images_lib.BadImage, match="smaller than the minimum side 100"):
        images_lib.random_crop(img[:90], 64, rng, True, "x.png", min_size=100, resize=False)


def test_images_above_the_pixel_limit_are_refused_before_they_are_decoded():
    import io

    from PIL import Image
    from support import decompression_bomb
    bomb = decompression_bomb(200_000, 200_000)                 # 40 gigapixels, 100 bytes
    with pytest.raises(images_lib.BadImage, match=r"bomb.png: 200000x200000 = 40,000,000,000 "
                                                  r"pixels is above the limit of 134,217,728"):
        images_lib.decode_rgb(bomb, "bomb.png")
    buf = io.BytesIO()
    Image.fromarray(skimage.data.camera()[:20, :30]).save(buf, format="PNG")
    assert images_lib.decode_rgb(buf.getvalue(), "small.png", max_pixels=600).shape == (20, 30, 3)
    with pytest.raises(images_lib.BadImage, match="30x20 = 600 pixels is above the limit of 599"):
        images_lib.decode_rgb(buf.getvalue(), "small.png", max_pixels=599)
    # PIL's own process-wide limit is left as it was.
    assert Image.MAX_IMAGE_PIXELS == 89478485
