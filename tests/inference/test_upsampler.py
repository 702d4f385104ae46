"""Tests of fmboost_jax/inference/upsampler.py: loading a trained workdir and boosting images of
any size the network takes."""

import jax
import numpy as np
import pytest

from fmboost_jax.cfm.upsampling import resize
from fmboost_jax.data import photos
from fmboost_jax.inference.upsampler import load_upsampler


def test_a_workdir_loads_with_its_config_and_boosts_any_size(tiny_workdir):
    up = load_upsampler(tiny_workdir)
    assert up.upscale == 4 and up.config.high_res_size == 16
    for shape in ((2, 4, 4, 3), (1, 6, 10, 3)):
        x = jax.random.uniform(jax.random.PRNGKey(0), shape, minval=-1, maxval=1)
        out = up(x, solver="euler", num_steps=2)
        assert out.images.shape == (shape[0], 4 * shape[1], 4 * shape[2], 3)
        assert int(out.stats["nfe"]) == 2
        bilinear = resize(x, out.images.shape[1:3], "bilinear")
        assert float(np.abs(np.asarray(out.images) - np.asarray(bilinear)).mean()) < 0.2


def test_the_same_options_and_shape_compile_once(tiny_workdir):
    up = load_upsampler(tiny_workdir)
    x = photos.eval_crops(("coffee",), 8, 2)
    a = up(x, solver="euler", num_steps=3)
    b = up(x + 0.01, solver="euler", num_steps=3)
    assert len(up._compiled) == 1 and not np.array_equal(a.images, b.images)
    up(x, solver="heun", num_steps=3)
    assert len(up._compiled) == 2


def test_bad_models_and_inputs_are_named(tiny_workdir, tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_upsampler(str(tmp_path / "nowhere"))
    with pytest.raises(ValueError, match="not a training workdir"):
        load_upsampler(str(tmp_path))
    up = load_upsampler(tiny_workdir)
    with pytest.raises(ValueError, match=r"\(B, h, w, 3\)"):
        up(np.zeros((4, 4, 3)))
