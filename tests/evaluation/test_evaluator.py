"""Tests of fmboost_jax/evaluation/evaluator.py: scores against bilinear and bicubic, the grid."""

import jax
import numpy as np
import pytest
from support import tiny_pixel_config

from fmboost_jax.cfm.model import CFM
from fmboost_jax.data import photos
from fmboost_jax.evaluation.evaluator import Evaluator, image_grid
from fmboost_jax.parallel import sharding


def test_an_untrained_model_scores_exactly_as_bilinear_at_the_held_out_size():
    c = tiny_pixel_config()
    cfm = CFM.from_config(c)                  # trained at 16 px; evaluated at 32 px
    images = photos.eval_crops(("coffee",), 32, 4)
    evaluator = Evaluator(cfm, c, images, sharding.make_mesh(c.mesh))
    params = cfm.init_params(jax.random.PRNGKey(0))          # zero output conv: v = 0
    results, grid = evaluator.run(params, {}, jax.random.PRNGKey(1))
    assert results["cfm/psnr"] == pytest.approx(results["bilinear/psnr"], abs=1e-4)
    assert results["cfm/ssim"] == pytest.approx(results["bilinear/ssim"], abs=1e-4)
    assert results["nfe"] == c.sampling.num_steps
    assert grid.dtype == np.uint8 and grid.shape == (2 * 128, 3 * 128, 3)   # 2 rows of 3 tiles


def test_the_grid_enlarges_tiles_and_maps_minus_one_one_to_uint8():
    tiles = [[np.full((2, 2, 3), -1.0), np.full((2, 2, 3), 1.0)]]
    grid = image_grid(tiles, min_tile=4)
    assert grid.shape == (4, 8, 3) and grid[0, 0, 0] == 0 and grid[0, 7, 0] == 255
