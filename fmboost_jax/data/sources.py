"""Random-access sources of training examples for grain.

- `FolderSource`: the image files under a folder, searched recursively, in sorted order;
- `TfdsSource`: a TFDS dataset prepared as array_record (`fmboost_jax.data.prepare`), read
  through `tfds.data_source` without TensorFlow, from a local directory or a bucket;
- `LatentRecordSource`: the records `fmboost_jax.precompute_latents` writes.

Image sources yield `{"bytes": encoded image, "path": name}`; decoding happens in the pipeline,
so that a bad file is skipped there instead of failing the read.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from typing import Any

import numpy as np
from flax import serialization

from fmboost_jax import paths
from fmboost_jax.data.images import EXTENSIONS
from fmboost_jax.errors import UserError


def list_images(folder: str, extensions: tuple[str, ...] = EXTENSIONS) -> list[str]:
    """Image files under `folder` (recursively, by extension, case-insensitive), sorted."""
    folder = paths.resolve(folder)
    if not paths.isdir(folder):
        raise FileNotFoundError(f"config.data.path: image folder {folder!r} does not exist")
    files = [f for f in paths.walk_files(folder)
             if f.lower().endswith(extensions) and not os.path.basename(f).startswith(".")]
    if not files:
        raise FileNotFoundError(f"config.data.path: no image files ({', '.join(extensions)}) "
                                f"under {folder!r}")
    return sorted(files)


class FolderSource:
    """Image files of a folder (or an explicit list of files), local or on a bucket."""

    def __init__(self, files: Sequence[str]):
        self.files = list(files)

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> dict[str, Any]:
        path = self.files[index]
        try:
            data = paths.read_bytes(path)
        except OSError as err:     # unreadable: the decoder reports it with the path
            data = f"unreadable: {err}".encode()
        return {"bytes": data, "path": path}


def tfds_dir(data_dir: str, name: str) -> str:
    return paths.join(data_dir, name)


class TfdsSource:
    """A split of a prepared TFDS dataset with `image` (encoded bytes) and `name` features."""

    def __init__(self, name: str, data_dir: str, split: str):
        import tensorflow_datasets as tfds
        root = paths.path(tfds_dir(data_dir, name))
        versions = sorted(p for p in root.glob("*.*.*") if (p / "dataset_info.json").exists()) \
            if root.exists() else []
        if not versions:
            raise FileNotFoundError(
                f"config.data.path/tfds_name: no prepared TFDS dataset at {root} (make it with "
                f"`python -m fmboost_jax.data.prepare --dataset={name} --manual_dir=... "
                f"--data_dir={data_dir}`)")
        # array_record reads local files only: a dataset on a bucket is read from a copy.
        builder = tfds.builder_from_directory(paths.local_tree(os.fspath(versions[-1])))
        if split not in builder.info.splits:
            raise UserError(f"config.data: TFDS dataset {name!r} has no split {split!r} "
                             f"(splits: {sorted(builder.info.splits)})")
        self.source = builder.as_data_source(split=split)
        self.description = f"{root} [{split}]"

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int) -> dict[str, Any]:
        ex = read_shard(self.source, index, self.description)
        name = ex.get("name", b"")
        return {"bytes": ex["image"],
                "path": f"{self.description}#{index}:{name.decode() if isinstance(name, bytes) else name}"}


def read_shard(source: Any, index: int, where: str) -> Any:
    """`source[index]` of an array-record source; a shard file that went missing or became
    unreadable during the run is a FileNotFoundError naming it (array_record's RuntimeError
    names the file it failed on)."""
    try:
        return source[index]
    except RuntimeError as err:
        raise FileNotFoundError(f"config.data.path: reading example {index} of {where} failed "
                                f"mid-run ({' '.join(str(err).split())}): restore the file, "
                                "then rerun to resume from the last checkpoint") from None


# ------------------------------------------------------------------------ latent records
LATENT_GLOB = "latents-*.array_record"
LATENT_INFO_FILE, LATENT_EVAL_FILE = "latents_info.json", "eval_images.npy"


def encode_latent_record(record: dict[str, np.ndarray]) -> bytes:
    return serialization.msgpack_serialize(
        {k: v if isinstance(v, str) else np.asarray(v) for k, v in record.items()})


def decode_latent_record(data: bytes) -> dict[str, np.ndarray]:
    return serialization.msgpack_restore(data)


def latent_files(folder: str) -> list[str]:
    files = paths.glob(folder, LATENT_GLOB)
    if not files:
        raise FileNotFoundError(f"config.data.path: no latent records ({LATENT_GLOB}) in "
                                f"{folder!r}; make them with `python -m fmboost_jax.precompute_latents`")
    return files


def latent_eval_file(folder: str) -> str | None:
    """The held-out images precompute_latents wrote next to the records, if any."""
    path = paths.join(folder, LATENT_EVAL_FILE)
    return path if paths.exists(path) else None


def latent_records_info(folder: str) -> dict[str, Any] | None:
    """`latents_info.json` of precompute_latents (the layout and settings), if present."""
    path = paths.join(folder, LATENT_INFO_FILE)
    return json.loads(paths.read_text(path)) if paths.exists(path) else None


def latent_records_incomplete(folder: str) -> str:
    """'' when every process of the precompute run has finished, else what is missing."""
    info = latent_records_info(folder)
    if info is None:
        return ""
    n = info["processes"]
    done = paths.glob(folder, f"done-p*-of-{n:06d}.json")
    if len(done) == n:
        return ""
    return (f"the latent records in {folder!r} are incomplete ({len(done)} of {n} processes "
            "finished); training reads the part written so far. Rerun precompute_latents to "
            "finish them.")


class LatentRecordSource:
    """Records with the VAE moments of a high-res image (`mean`, `logvar`) and of its PSU input
    (`mean_lowres`, `logvar_lowres`), unscaled (B, h, w, C) float32 each; optionally `image`.
    Records on a bucket are read from copies on this host's disk (`paths.local_copy`: array_record
    reads local files only), made once."""

    def __init__(self, folder: str):
        import grain
        self.folder, self.files = folder, latent_files(folder)
        local = [paths.local_copy(f) for f in self.files]
        self.source = grain.sources.ArrayRecordDataSource(local)

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        return decode_latent_record(read_shard(self.source, index, self.folder))
