"""Tests of fmboost_jax/data/photos.py: the demo's crops of scikit-image photos."""

import numpy as np
import pytest

from fmboost_jax.data import photos


def test_batches_are_a_pure_function_of_seed_and_step():
    a = photos.PhotoCrops(("astronaut", "camera"), 32, 4, seed=0)
    b = photos.PhotoCrops(("astronaut", "camera"), 32, 4, seed=0)
    np.testing.assert_array_equal(a.batch(3)["image"], b.batch(3)["image"])
    assert not np.array_equal(a.batch(3)["image"], a.batch(4)["image"])
    x = a.batch(0)["image"]
    assert x.shape == (4, 32, 32, 3) and x.dtype == np.float32 and -1 <= x.min() <= x.max() <= 1


def test_eval_crops_are_fixed_and_unknown_photos_are_named():
    np.testing.assert_array_equal(photos.eval_crops(("coffee",), 16, 3),
                                  photos.eval_crops(("coffee",), 16, 3))
    with pytest.raises(ValueError, match="unknown photo 'lena'"):
        photos.load_photo("lena")
