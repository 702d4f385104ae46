"""Shared test helpers: tiny configs that exercise the real code paths quickly."""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax  # noqa: E402
import pytest  # noqa: E402

# Identical programs compiled by different tests (each training run builds fresh closures)
# are read back from a persistent cache instead of being compiled again.
jax.config.update("jax_compilation_cache_dir",
                  os.path.join(os.path.dirname(os.path.abspath(__file__)), ".jax_cache"))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)

import tiny_config as tiny_config_file  # noqa: E402  (tests/tiny_config.py)


def tiny_pixel_config():
    """A pixel-space 4x config small enough to train a few steps in seconds."""
    c = tiny_config_file.get_config()
    c.data.num_eval_images = 4
    c.batch_size = 4
    return c


@pytest.fixture
def tiny_config():
    return tiny_pixel_config()
