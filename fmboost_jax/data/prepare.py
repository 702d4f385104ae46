"""Prepare a TFDS dataset (array_record, no TensorFlow needed) from downloaded images.

    python -m fmboost_jax.data.prepare --dataset=lhq --manual_dir=~/data/LHQ1024 \
        --data_dir=~/tensorflow_datasets
    python -m fmboost_jax.data.prepare --dataset=faceshq --manual_dir=~/data/faceshq \
        --data_dir=gs://bucket/tfds
    python -m fmboost_jax.data.prepare --dataset=image_folder --name=my_photos \
        --manual_dir=~/photos --data_dir=...

Then train with `--config.data.name=tfds --config.data.tfds_name=<dataset or --name>
--config.data.path=<data_dir>` (configs/lhq.py and faceshq.py already point there).
See `fmboost_jax/data/builders.py` for the expected layouts and the splits.
"""

from __future__ import annotations

import functools
import os
import sys
import tempfile

from absl import app, flags

from fmboost_jax import paths
from fmboost_jax.cli import run_app, user_errors_in_one_line
from fmboost_jax.data import builders

_DATASET = flags.DEFINE_enum("dataset", None, sorted(builders.BUILDERS), "Which dataset to build.")
_MANUAL_DIR = flags.DEFINE_string("manual_dir", None, "Folder with the downloaded images.")
_DATA_DIR = flags.DEFINE_string("data_dir", "~/tensorflow_datasets", "TFDS data_dir to write to.")
_NAME = flags.DEFINE_string("name", "", "Dataset name for --dataset=image_folder "
                            "(the config's data.tfds_name); default: image_folder.")
flags.mark_flags_as_required(["dataset", "manual_dir"])


@functools.cache
def _named_folder_builder(name: str) -> type:
    """The image-folder builder under another dataset name (TFDS registers a name once)."""
    base = builders.BUILDERS["image_folder"]
    return type(name.title().replace("_", ""), (base,), {"name": name, "__doc__": base.__doc__})


def prepare(dataset: str, manual_dir: str, data_dir: str, name: str = "") -> str:
    """Builds the dataset; returns the directory it was written to. A `data_dir` on a bucket is
    built in a local temporary folder and uploaded (array_record writes local files only)."""
    import tensorflow_datasets as tfds
    manual_dir = os.path.expanduser(manual_dir)
    if not os.path.isdir(manual_dir):
        raise FileNotFoundError(f"--manual_dir {manual_dir!r} is not a folder")
    cls = builders.BUILDERS[dataset]
    if dataset == "image_folder" and name and name != "image_folder":
        cls = _named_folder_builder(name)
    data_dir = paths.resolve(data_dir)
    with tempfile.TemporaryDirectory(prefix="fmboost-tfds-") as local:
        build_dir = local if paths.is_remote(data_dir) else data_dir
        builder = cls(data_dir=build_dir, file_format="array_record")
        builder.download_and_prepare(
            download_config=tfds.download.DownloadConfig(manual_dir=manual_dir))
        built = os.fspath(builder.data_dir)
        if build_dir == data_dir:
            return built
        remote = paths.join(data_dir, os.path.relpath(built, local))
        paths.upload_tree(built, remote)
        return remote


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    with user_errors_in_one_line():
        out = prepare(_DATASET.value, _MANUAL_DIR.value, _DATA_DIR.value, _NAME.value)
    print(f"wrote {out}", file=sys.stderr)


def run() -> None:
    """Console script `fmboost-prepare`."""
    run_app(main)


if __name__ == "__main__":
    run()
