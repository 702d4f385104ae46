"""Shared test helpers: tiny configs that exercise the real code paths quickly."""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import pytest  # noqa: E402

# Identical programs compiled by different tests (each training run builds fresh closures)
# are read back from a persistent cache instead of being compiled again.
jax.config.update("jax_compilation_cache_dir",
                  os.path.join(os.path.dirname(os.path.abspath(__file__)), ".jax_cache"))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)

from fmboost_jax.config import base_config  # noqa: E402


def tiny_pixel_config():
    """A pixel-space 4x config small enough to train a few steps in seconds."""
    c = base_config()
    c.low_res_size, c.high_res_size = 4, 16
    c.coupling.noising_step = -1
    c.unet.update(in_channels=6, model_channels=32, out_channels=3, num_res_blocks=1,
                  channel_mult=(1, 2), attention_resolutions=(2,), dim_head=8, num_heads=2)
    c.optim.update(lr=1e-3, warmup_steps=2)
    c.ema.update(rate=0.9, update_after_step=1)
    c.data.train_photos = ("astronaut", "chelsea")
    c.data.eval_photos = ("coffee",)
    c.data.num_eval_images = 4
    c.batch_size = 4
    c.total_steps = 6
    c.log_every, c.eval_every, c.checkpoint_every = 2, 6, 3
    c.sampling.update(solver="euler", num_steps=2)
    c.num_grid_images = 2
    return c


@pytest.fixture
def tiny_config():
    return tiny_pixel_config()
