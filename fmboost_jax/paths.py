"""Paths that may be local or on a bucket (`gs://...`): the package's file I/O goes through here.

Remote paths are read and written with etils.epath (gcsfs for `gs://`); Orbax checkpoints reach
buckets through tensorstore on their own. What a bucket guarantees differs from a disk:
- an object appears whole or not at all when its upload completes, so `atomic_write` writes a
  local temporary file and uploads it only when the block ends without an error (there is no
  rename on a bucket: a copy and a delete);
- there is no append: a file that grows (`metrics.jsonl`) is rewritten whole;
- libraries that open files themselves (array_record) need a local copy: `local_copy` stages a
  remote file on this host's disk once (`$FMBOOST_STAGE_DIR`, default `~/.cache/fmboost_jax/staged`).

Directory listings are not cached (gcsfs caches them by default), so files that other processes
or tensorstore wrote are seen at once.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import tempfile
from collections.abc import Iterator
from typing import BinaryIO

import fsspec
from etils import epath

for _protocol in ("gs", "gcs"):            # before the first gcsfs instance is made
    fsspec.config.conf.setdefault(_protocol, {}).setdefault("use_listings_cache", False)


class _Once(logging.Filter):
    """Lets a warning that starts with one of `prefixes` through once per process: gcsfs repeats
    "Could not determine bucket type" on every listing where the storage-layout API is out of
    reach (no default credentials, an emulator), thousands of lines in a run."""

    def __init__(self, *prefixes: str):
        super().__init__()
        self.prefixes, self.seen = prefixes, set()

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        prefix = next((p for p in self.prefixes if message.startswith(p)), None)
        if prefix is None:
            return True
        first = prefix not in self.seen
        self.seen.add(prefix)
        return first


logging.getLogger("gcsfs").addFilter(_Once("Could not determine bucket type", "Error: Bucket"))

STAGE_ENV = "FMBOOST_STAGE_DIR"            # where remote files are copied for local readers


def is_remote(path: str | os.PathLike) -> bool:
    """True for URLs such as `gs://bucket/dir`."""
    return "://" in os.fspath(path)


def resolve(path: str | os.PathLike) -> str:
    """`~` expanded and made absolute, unless the path is remote."""
    path = os.fspath(path)
    return path if is_remote(path) else os.path.abspath(os.path.expanduser(path))


def join(folder: str | os.PathLike, *parts: str) -> str:
    """`folder/part/...` as a string, for local folders and buckets alike."""
    return os.path.join(resolve(folder), *parts)


def path(p: str | os.PathLike) -> epath.Path:
    """An epath.Path of the resolved path (local or remote)."""
    return epath.Path(resolve(p))


def exists(p: str | os.PathLike) -> bool:
    return path(p).exists()


def isdir(p: str | os.PathLike) -> bool:
    return path(p).is_dir()


def isfile(p: str | os.PathLike) -> bool:
    return path(p).is_file()


def makedirs(p: str | os.PathLike) -> None:
    """Creates the folder and its parents (nothing to do on a bucket, where folders are names)."""
    if not is_remote(p):
        os.makedirs(resolve(p), exist_ok=True)


def read_bytes(p: str | os.PathLike) -> bytes:
    return path(p).read_bytes()


def read_text(p: str | os.PathLike) -> str:
    return path(p).read_text()


def glob(folder: str | os.PathLike, pattern: str) -> list[str]:
    """The files directly in `folder` whose names match `pattern` (no `**`), sorted."""
    return sorted(os.fspath(p) for p in path(folder).glob(pattern))


def _fs(url: str) -> tuple[fsspec.AbstractFileSystem, str]:
    return fsspec.core.url_to_fs(url)


def walk_files(folder: str | os.PathLike) -> list[str]:
    """Every file under `folder`, recursively (symbolic links followed on disk), sorted."""
    folder = resolve(folder)
    if not is_remote(folder):
        return sorted(os.path.join(root, f) for root, _, names in os.walk(folder, followlinks=True)
                      for f in names)
    fs, root = _fs(folder)
    protocol = folder.split("://", 1)[0]      # keys ending in "/": folder placeholders
    return sorted(f"{protocol}://{key}" for key in fs.find(root) if not key.endswith("/"))


def write_text(p: str | os.PathLike, text: str) -> None:
    """`text` as the whole file `p`, atomically (see `atomic_write`)."""
    with atomic_write(p) as f:
        f.write(text.encode())


@contextlib.contextmanager
def atomic_file(p: str | os.PathLike) -> Iterator[str]:
    """A temporary local file name whose file becomes `p` only when the block ends without an
    error: in the same folder on disk (renamed onto a local `p`), else in the system's temporary
    folder (uploaded to a remote `p`). A crash leaves the previous `p` (or none), never half a
    file. For writers that take a file name (array_record); see `atomic_write` for the others."""
    p = resolve(p)
    remote = is_remote(p)
    folder = tempfile.gettempdir() if remote else os.path.dirname(p)
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=os.path.basename(p) + ".", suffix=".tmp")
    os.close(fd)
    try:
        yield tmp
        if remote:
            upload(tmp, p)
        else:
            os.chmod(tmp, 0o644)              # mkstemp's 0600 would make the file private
            os.replace(tmp, p)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


@contextlib.contextmanager
def atomic_write(p: str | os.PathLike) -> Iterator[BinaryIO]:
    """A binary file that becomes `p` only when the block ends without an error (`atomic_file`),
    flushed to disk first."""
    with atomic_file(p) as tmp, open(tmp, "wb") as f:
        yield f
        f.flush()
        os.fsync(f.fileno())


def upload(local: str, remote: str) -> None:
    """Copies the local file onto the remote path: the object appears when the upload completes,
    and a failed upload leaves none (fsspec's `put_file`; a file object would be finalised
    half-written when closed after an error)."""
    fs, key = _fs(remote)
    fs.put_file(local, key)


def upload_tree(local: str, remote: str, last: tuple[str, ...] = ("dataset_info.json",)) -> None:
    """Uploads every file under the local folder to the same relative paths under `remote`; files
    named in `last` (those whose presence says the folder is complete) go up last."""
    files = sorted(walk_files(local), key=lambda f: os.path.basename(f) in last)
    for f in files:
        upload(f, join(remote, os.path.relpath(f, local)))


def stage_dir() -> str:
    """Where `local_copy` keeps remote files: `$FMBOOST_STAGE_DIR`, else a folder of the user's
    cache (`$XDG_CACHE_HOME` or `~/.cache`)."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.expanduser(os.environ.get(STAGE_ENV) or os.path.join(base, "fmboost_jax", "staged"))


def local_tree(folder: str | os.PathLike) -> str:
    """A local folder with the files under `folder`: `folder` itself when local, else copies in
    `stage_dir()` (`local_copy` of each file, in the same layout)."""
    folder = resolve(folder)
    if not is_remote(folder):
        return folder
    local = os.path.join(stage_dir(), hashlib.sha256(folder.encode()).hexdigest()[:16] + "-tree")
    for f in walk_files(folder):
        target = os.path.join(local, f[len(folder.rstrip("/")) + 1:])
        os.makedirs(os.path.dirname(target), exist_ok=True)
        copy = local_copy(f)
        if not (os.path.exists(target) and os.path.samefile(copy, target)):
            link = f"{target}.{os.getpid()}.tmp"   # linked, then renamed: processes may race
            os.link(copy, link)
            os.replace(link, target)
    return local


def local_copy(p: str | os.PathLike) -> str:
    """A local path with the contents of `p`: `p` itself when local, else a copy in `stage_dir()`
    made once per remote path and version (a changed file, by the store's metadata, is copied
    again)."""
    p = resolve(p)
    if not is_remote(p):
        return p
    fs, key = _fs(p)
    info = fs.info(key)                   # size, generation, checksum...: any change shows
    digest = hashlib.sha256(f"{p} {sorted(info.items())}".encode()).hexdigest()[:16]
    local = os.path.join(stage_dir(), f"{digest}-{os.path.basename(p)}")
    if not os.path.exists(local):
        with atomic_file(local) as tmp:
            fs.get_file(key, tmp)
    return local
