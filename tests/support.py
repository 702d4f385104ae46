"""Helpers shared by the tests: the repository root, tiny configs, config files by name, and
directories made once for all pytest workers."""

import fcntl
import os
from collections.abc import Callable

import tiny_config

from fmboost_jax.config import load_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def made_once(tmp_path_factory, name: str, make: Callable[[str], None]) -> str:
    """The directory `name` that `make(path)` fills once per test run: the pytest-xdist workers
    of one run share it (the first one makes it while the others wait on a lock), so a slow
    finished run or saved model is built once, not once per worker."""
    base = tmp_path_factory.getbasetemp()
    shared = str(base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base)
    path, done = os.path.join(shared, name), os.path.join(shared, f"{name}.done")
    with open(os.path.join(shared, f"{name}.lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not os.path.exists(done):
            os.makedirs(path, exist_ok=True)
            make(path)
            open(done, "w").close()
    return path


def devices_env(devices: int, **extra: str) -> dict[str, str]:
    """The environment of a subprocess that sees `devices` fake CPU devices, with the tests' own
    XLA flags (conftest) kept. One device is the CPU's default and adds no flag, so that the
    subprocess shares the compilation cache's keys (which hold every XLA flag) with the tests'
    own processes."""
    count = "--xla_force_host_platform_device_count"
    flags = [f for f in os.environ.get("XLA_FLAGS", "").split() if not f.startswith(count + "=")]
    if devices != 1:
        flags.append(f"{count}={devices}")
    return dict(os.environ, XLA_FLAGS=" ".join(flags), **extra)


def flat_unet(c):
    """`c` with a one-level UNet without attention (compiles fastest), for tests of what does
    not depend on the UNet's depth; returns `c`."""
    c.unet.update(channel_mult=(1,), attention_resolutions=())
    return c


def tiny_pixel_config():
    """A pixel-space 4x config small enough to train a few steps in seconds: one UNet level, no
    attention (the UNet's own tests cover its levels and attention)."""
    c = tiny_config.get_config("flat")             # flat_unet's UNet
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
