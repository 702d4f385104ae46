"""Tests of fmboost_jax/data/prepare.py: a folder of photos becomes a TFDS dataset the pipeline
reads."""

import os

from photo_folder import config_for

from fmboost_jax.data import pipeline, sources
from fmboost_jax.data.prepare import prepare


def test_prepare_writes_the_usable_photos_and_the_pipeline_reads_them(photo_folder, tmp_path):
    out = prepare("image_folder", str(photo_folder), str(tmp_path / "tfds"), name="test_photos")
    assert os.path.isdir(out)
    train = sources.TfdsSource("test_photos", str(tmp_path / "tfds"), "train")
    val = sources.TfdsSource("test_photos", str(tmp_path / "tfds"), "validation")
    # 13 files, 1 for validation; fake, truncated and tiny (< 256 px) are left out.
    assert len(train) + len(val) == 10 and len(val) == 1
    names = {train[i]["path"].split(":", 1)[1] for i in range(len(train))}
    assert "fake.jpg" not in names and "tiny.png" not in names and "cmyk.jpg" in names
    config = config_for(tmp_path / "tfds", name="tfds", tfds_name="test_photos")
    pipeline.check_data(config)
    assert next(pipeline.create_train_iterator(config))["image"].shape == (4, 64, 64, 3)
    assert pipeline.eval_images(config).shape == (1, 64, 64, 3)

