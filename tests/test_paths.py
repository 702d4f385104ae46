"""Tests of fmboost_jax/paths.py: local paths made absolute, bucket paths kept."""

import os

from fmboost_jax import paths


def test_local_paths_are_expanded_and_made_absolute_and_buckets_are_kept():
    assert paths.resolve("~/x") == os.path.join(os.path.expanduser("~"), "x")
    assert paths.resolve("runs/a") == os.path.join(os.getcwd(), "runs", "a")
    assert paths.resolve("gs://bucket/runs") == "gs://bucket/runs"
    assert paths.is_remote("gs://b/x") and not paths.is_remote("/tmp/x")
