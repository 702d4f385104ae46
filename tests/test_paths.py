"""Tests of fmboost_jax/paths.py: local paths made absolute, bucket paths kept, atomic writes."""

import os
import stat

import pytest

from fmboost_jax import paths


def test_local_paths_are_expanded_and_made_absolute_and_buckets_are_kept():
    assert paths.resolve("~/x") == os.path.join(os.path.expanduser("~"), "x")
    assert paths.resolve("runs/a") == os.path.join(os.getcwd(), "runs", "a")
    assert paths.resolve("gs://bucket/runs") == "gs://bucket/runs"
    assert paths.is_remote("gs://b/x") and not paths.is_remote("/tmp/x")


def test_atomic_write_replaces_a_file_only_when_the_block_succeeds(tmp_path):
    target = tmp_path / "new" / "report.json"
    with paths.atomic_write(target) as f:        # the folder is made
        f.write(b"first")
    assert target.read_bytes() == b"first"
    assert stat.S_IMODE(os.stat(target).st_mode) == 0o644
    with pytest.raises(RuntimeError), paths.atomic_write(target) as f:
        f.write(b"half of the second")
        raise RuntimeError("crash mid-write")
    assert target.read_bytes() == b"first"       # the old file, whole
    assert os.listdir(target.parent) == ["report.json"]          # no temporary left behind
