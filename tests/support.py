"""Helpers shared by the tests: the repository root, tiny configs, config files by name."""

import os

import tiny_config

from fmboost_jax.config import load_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_pixel_config():
    """A pixel-space 4x config small enough to train a few steps in seconds."""
    c = tiny_config.get_config()
    c.data.num_eval_images = 4
    c.batch_size = 4
    return c


def config(spec: str):
    """A config of `configs/` by name, e.g. `config("lhq:smoke")`."""
    return load_config(spec)
