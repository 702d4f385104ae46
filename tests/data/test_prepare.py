"""Tests of fmboost_jax/data/prepare.py: a folder of photos becomes a TFDS dataset the pipeline
reads."""

import pytest
from photo_folder import config_for

from fmboost_jax import paths
from fmboost_jax.data import pipeline, sources
from fmboost_jax.data.prepare import prepare


@pytest.fixture(params=["disk", "bucket"])
def data_dir(request, tmp_path):
    """A TFDS data_dir on the local disk, or on a bucket of the loopback GCS server."""
    if request.param == "disk":
        return str(tmp_path / "tfds")
    return f"{request.getfixturevalue('gcs_bucket')}/tfds"


def test_prepare_writes_the_usable_photos_and_the_pipeline_reads_them(photo_folder, data_dir):
    out = prepare("image_folder", str(photo_folder), data_dir, name="test_photos")
    assert paths.isdir(out) and out.startswith(data_dir)       # built locally, then uploaded
    train = sources.TfdsSource("test_photos", data_dir, "train")
    val = sources.TfdsSource("test_photos", data_dir, "validation")
    # 13 files, 1 for validation; fake, truncated and tiny (< 256 px) are left out.
    assert len(train) + len(val) == 10 and len(val) == 1
    names = {train[i]["path"].rsplit(":", 1)[1] for i in range(len(train))}
    assert "fake.jpg" not in names and "tiny.png" not in names and "cmyk.jpg" in names
    config = config_for(data_dir, name="tfds", tfds_name="test_photos")
    pipeline.check_data(config)
    assert next(pipeline.create_train_iterator(config))["image"].shape == (4, 64, 64, 3)
    assert pipeline.eval_images(config).shape == (1, 64, 64, 3)

