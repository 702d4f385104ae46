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


def decompression_bomb(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height 8-bit gray pixels, with a few bytes of data: what
    a decompression bomb looks like to a decoder before it decodes."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
            + chunk(b"IEND", b""))
