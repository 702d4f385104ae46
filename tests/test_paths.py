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


def test_on_a_bucket_a_file_appears_whole_or_not_at_all_and_is_listed_and_staged(
        gcs_bucket, tmp_path, monkeypatch):
    """Against the loopback GCS server: the same operations the commands use on buckets."""
    target = f"{gcs_bucket}/run/report.json"
    with pytest.raises(RuntimeError), paths.atomic_write(target) as f:
        f.write(b"half")
        raise RuntimeError("crash mid-write")
    assert not paths.exists(target)                                   # nothing uploaded
    paths.write_text(target, "first")
    with pytest.raises(RuntimeError), paths.atomic_write(target) as f:
        f.write(b"half of the second")
        raise RuntimeError("crash mid-write")
    assert paths.read_text(target) == "first"
    for name in ("a.png", "sub/b.png", "sub/deeper/c.png"):
        paths.write_text(f"{gcs_bucket}/images/{name}", name)
    fs, _ = paths._fs(gcs_bucket)
    fs.pipe_file(f"{gcs_bucket[5:]}/images/made-in-the-console/", b"")   # a folder placeholder
    assert paths.walk_files(f"{gcs_bucket}/images") == [
        f"{gcs_bucket}/images/{n}" for n in ("a.png", "sub/b.png", "sub/deeper/c.png")]
    assert paths.glob(f"{gcs_bucket}/images", "*.png") == [f"{gcs_bucket}/images/a.png"]
    assert paths.isdir(f"{gcs_bucket}/images/sub") and paths.isfile(f"{gcs_bucket}/images/a.png")
    monkeypatch.setenv(paths.STAGE_ENV, str(tmp_path / "staged"))
    local = paths.local_copy(target)                    # a local file for array_record & co.
    assert local.startswith(str(tmp_path)) and open(local).read() == "first"
    paths.write_text(target, "later")                   # changed (same size): copied again
    assert open(paths.local_copy(target)).read() == "later"
    tree = paths.local_tree(f"{gcs_bucket}/images")
    assert open(os.path.join(tree, "sub", "deeper", "c.png")).read() == "sub/deeper/c.png"
    assert not os.path.exists("gs:")


def test_a_folder_is_uploaded_with_its_completeness_marker_last(tmp_path, monkeypatch):
    """TFDS takes a version folder with `dataset_info.json` as complete: an interrupted upload
    must not look complete."""
    for name in ("a.array_record", "dataset_info.json", "z.json"):
        (tmp_path / name).write_text(name)
    order = []
    monkeypatch.setattr(paths, "upload", lambda local, remote: order.append(remote))
    paths.upload_tree(str(tmp_path), "gs://bucket/tfds/x/1.0.0")
    assert order == [f"gs://bucket/tfds/x/1.0.0/{n}" for n in ("a.array_record", "z.json",
                                                              "dataset_info.json")]

