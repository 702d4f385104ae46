"""TFDS builders for LHQ, FacesHQ and any image folder, written as array_record without TensorFlow.

Each builder reads the image files a user downloaded by hand (`manual_dir`), checks that each
decodes (in parallel threads), and stores the usable ones unchanged (the encoded bytes, no
re-compression) with their relative path, in `train` and `validation` splits. Files that
cannot be decoded, or whose shorter side is below `MIN_SIZE`, are left out and listed in the log.
Reading goes through `tfds.data_source` (`fmboost_jax.data.sources.TfdsSource`), locally or from a
bucket.

- `lhq`: LHQ (Landscapes HQ, 90,000 photos at 1024²; https://github.com/universome/alis),
  any folder layout under `manual_dir`; the last 1% of the sorted files (at most 1,000) are
  the validation split.
- `faceshq`: FacesHQ = CelebA-HQ + FFHQ at 1024², from `manual_dir/celebahq/` and
  `manual_dir/ffhq/` (taming-transformers' layout: CelebA-HQ as image files or as the `.npy`
  arrays of the PGGAN tools, (1, 3, H, W) or (H, W, 3) uint8, stored as PNG); validation: the
  last 1% of each.
- `image_folder`: any folder; `manual_dir/train/` and `manual_dir/validation/` if present,
  else the last 1% of the files become the validation split.
"""

from __future__ import annotations

import concurrent.futures
import io
import os
from collections.abc import Iterator

import numpy as np
import tensorflow_datasets as tfds
from absl import logging
from PIL import Image

from fmboost_jax.data import images as images_lib
from fmboost_jax.data.sources import list_images
from fmboost_jax.errors import UserError

MIN_SIZE = 256
EXTENSIONS = images_lib.EXTENSIONS + (".npy",)
VALIDATION_FRACTION, MAX_VALIDATION = 0.01, 1000


def split_files(files: list[str]) -> tuple[list[str], list[str]]:
    """(train, validation): the last 1% of the sorted files (at most 1,000, at least 1) validate."""
    n_val = min(MAX_VALIDATION, max(1, int(len(files) * VALIDATION_FRACTION)))
    if len(files) < 2:
        raise UserError(f"need at least 2 images to make train and validation splits, got {len(files)}")
    return files[:-n_val], files[-n_val:]


class _ImageBuilder(tfds.core.GeneratorBasedBuilder):
    """Encoded images and their names, from files under `manual_dir`."""
    VERSION = tfds.core.Version("1.0.0")
    MANUAL_DOWNLOAD_INSTRUCTIONS = "See fmboost_jax/data/builders.py."
    # No download checksums to look up: tfds's lookup of the builder's source file needs
    # `importlib_resources`, which is not one of its dependencies.
    code_path = None

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self, description=(self.__doc__ or "").strip(),
            features=tfds.features.FeaturesDict({
                "image": tfds.features.Tensor(shape=(), dtype=np.object_),   # encoded bytes
                "name": tfds.features.Text(),
            }))

    def _splits(self, manual_dir: str) -> dict[str, list[tuple[str, str]]]:
        """split -> [(file, name)]."""
        raise NotImplementedError

    def _split_generators(self, dl_manager: tfds.download.DownloadManager):
        manual_dir = os.fspath(dl_manager.manual_dir)
        return {split: self._generate_examples(files)
                for split, files in self._splits(manual_dir).items()}

    def _generate_examples(self, files: list[tuple[str, str]]) -> Iterator[tuple[str, dict]]:
        for path, name in files:
            yield name, {"image": read_encoded(path), "name": name}


def read_encoded(path: str) -> bytes:
    """The file's bytes; a `.npy` array (CHW or HWC uint8, a leading 1 allowed) as PNG."""
    if not path.lower().endswith(".npy"):
        with open(path, "rb") as f:
            return f.read()
    try:
        a = np.load(path, allow_pickle=False)
    except (ValueError, EOFError) as err:
        raise images_lib.BadImage(f"{path}: not a readable array ({err})") from None
    a = a.reshape(a.shape[-3:]) if a.ndim == 4 and a.shape[0] == 1 else a
    if a.ndim == 3 and a.shape[0] in (1, 3) and a.shape[-1] not in (1, 3):
        a = a.transpose(1, 2, 0)
    if a.dtype != np.uint8 or a.ndim != 3 or a.shape[-1] not in (1, 3):
        raise images_lib.BadImage(f"{path}: array of {a.dtype} {a.shape} is not a uint8 image")
    buf = io.BytesIO()
    Image.fromarray(a[..., 0] if a.shape[-1] == 1 else a).save(buf, "PNG")
    return buf.getvalue()


def usable(path: str) -> bool:
    """Decodes the file fully; False (logged with the reason) if it is bad or too small."""
    try:
        h, w = images_lib.decode_rgb(read_encoded(path), path).shape[:2]
        if min(h, w) < MIN_SIZE:
            raise images_lib.BadImage(f"{path}: {h}x{w} is smaller than {MIN_SIZE}")
        return True
    except (images_lib.BadImage, OSError) as err:
        logging.warning("Leaving out %s", err)
        return False


def usable_images(root: str) -> list[str]:
    """The usable image files under `root`, sorted (checked in parallel threads)."""
    try:
        files = list_images(root, EXTENSIONS)
    except FileNotFoundError as err:
        raise FileNotFoundError(f"--manual_dir: {str(err).removeprefix('config.data.path: ')}") \
            from None
    with concurrent.futures.ThreadPoolExecutor(os.cpu_count() or 4) as pool:
        keep = list(pool.map(usable, files))
    good = [f for f, k in zip(files, keep) if k]
    logging.info("%s: %d usable images, %d left out", root, len(good), len(files) - len(good))
    if not good:
        raise UserError(f"--manual_dir: no usable image under {root}")
    return good


def _named(files: list[str], root: str) -> list[tuple[str, str]]:
    return [(f, os.path.relpath(f, root)) for f in files]


class Lhq(_ImageBuilder):
    """LHQ: 90,000 landscape photos at 1024x1024 (Skorokhodov et al., ALIS)."""

    def _splits(self, manual_dir):
        train, val = split_files(usable_images(manual_dir))
        return {"train": _named(train, manual_dir), "validation": _named(val, manual_dir)}


class Faceshq(_ImageBuilder):
    """FacesHQ: CelebA-HQ and FFHQ faces at 1024x1024."""

    def _splits(self, manual_dir):
        out = {"train": [], "validation": []}
        for part in ("celebahq", "ffhq"):
            root = os.path.join(manual_dir, part)
            if not os.path.isdir(root):
                raise FileNotFoundError(f"--manual_dir: FacesHQ needs {root}/ (and the other of "
                                        "celebahq/, ffhq/) holding the 1024² images")
            train, val = split_files(usable_images(root))
            out["train"] += _named(train, manual_dir)
            out["validation"] += _named(val, manual_dir)
        return out


class ImageFolder(_ImageBuilder):
    """Any folder of images (searched recursively)."""

    def _splits(self, manual_dir):
        train_dir, val_dir = os.path.join(manual_dir, "train"), os.path.join(manual_dir, "validation")
        if os.path.isdir(train_dir) and os.path.isdir(val_dir):
            return {"train": _named(usable_images(train_dir), manual_dir),
                    "validation": _named(usable_images(val_dir), manual_dir)}
        train, val = split_files(usable_images(manual_dir))
        return {"train": _named(train, manual_dir), "validation": _named(val, manual_dir)}


BUILDERS = {"lhq": Lhq, "faceshq": Faceshq, "image_folder": ImageFolder}
