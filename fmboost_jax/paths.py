"""Paths that may be local or on a bucket (`gs://...`, read through etils.epath)."""

from __future__ import annotations

import os


def is_remote(path: str | os.PathLike) -> bool:
    """True for URLs such as `gs://bucket/dir`."""
    return "://" in os.fspath(path)


def resolve(path: str | os.PathLike) -> str:
    """`~` expanded and made absolute, unless the path is remote."""
    path = os.fspath(path)
    return path if is_remote(path) else os.path.abspath(os.path.expanduser(path))
