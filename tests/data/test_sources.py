"""Tests of fmboost_jax/data/sources.py: image folders, latent records and their files."""

import json

import numpy as np
import pytest
from array_record.python.array_record_module import ArrayRecordWriter

from fmboost_jax.data import sources


def test_folders_are_listed_recursively_by_extension_sorted(photo_folder):
    files = sources.list_images(str(photo_folder))
    assert files == sorted(files) and any("/a/b/" in f for f in files)
    assert not any(f.endswith("notes.txt") for f in files)
    src = sources.FolderSource(files)
    assert len(src) == len(files) and src[0]["path"] == files[0] and src[0]["bytes"]


def test_missing_or_empty_folders_name_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"config\.data\.path: image folder .* not exist"):
        sources.list_images(str(tmp_path / "nowhere"))
    with pytest.raises(FileNotFoundError, match="no latent records .*precompute_latents"):
        sources.LatentRecordSource(str(tmp_path))


def test_latent_records_round_trip_and_report_unfinished_runs(tmp_path):
    record = {"mean": np.ones((2, 2, 4), np.float32), "name": "a.jpg"}
    writer = ArrayRecordWriter(str(tmp_path / "latents-p000000-of-000002-c00000.array_record"),
                               "group_size:1")
    writer.write(sources.encode_latent_record(record))
    writer.close()
    src = sources.LatentRecordSource(str(tmp_path))
    assert len(src) == 1 and src[0]["name"] == "a.jpg"
    np.testing.assert_array_equal(src[0]["mean"], record["mean"])
    assert sources.latent_records_incomplete(str(tmp_path)) == ""          # no info: no claim
    (tmp_path / sources.LATENT_INFO_FILE).write_text(json.dumps({"processes": 2}))
    (tmp_path / "done-p000000-of-000002.json").write_text("{}")
    assert "incomplete (1 of 2 processes finished)" in \
        sources.latent_records_incomplete(str(tmp_path))


def test_a_shard_that_goes_missing_mid_run_is_named(tmp_path):
    z = np.zeros((2, 2, 4), np.float32)
    for shard in range(2):
        writer = ArrayRecordWriter(str(tmp_path / f"latents-p000000-of-000001-c{shard:05d}"
                                                  ".array_record"), "group_size:1")
        writer.write(sources.encode_latent_record({"mean": z, "logvar": z}))
        writer.close()
    src = sources.LatentRecordSource(str(tmp_path))
    assert src[0]["mean"].shape == (2, 2, 4)              # the run is under way
    gone = tmp_path / "latents-p000000-of-000001-c00001.array_record"
    gone.unlink()                                          # e.g. a bucket's object deleted
    with pytest.raises(FileNotFoundError, match=rf"config.data.path: reading example 1 of "
                                                rf"{tmp_path} failed mid-run .*{gone.name}.*rerun"):
        src[1]

