"""Paths that may be local or on a bucket (`gs://...`, read through etils.epath)."""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from typing import BinaryIO


def is_remote(path: str | os.PathLike) -> bool:
    """True for URLs such as `gs://bucket/dir`."""
    return "://" in os.fspath(path)


def resolve(path: str | os.PathLike) -> str:
    """`~` expanded and made absolute, unless the path is remote."""
    path = os.fspath(path)
    return path if is_remote(path) else os.path.abspath(os.path.expanduser(path))


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike) -> Iterator[BinaryIO]:
    """A binary file that becomes the local `path` only when the block ends without an error:
    written to a temporary file in the same folder (created if missing), flushed to disk, then
    renamed onto `path`. A crash leaves the previous `path` (or none), never half a file."""
    path = resolve(path)
    folder = os.path.dirname(path)
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=os.path.basename(path) + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)                  # mkstemp's 0600 would make the file private
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
