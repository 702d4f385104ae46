"""Precompute the VAE latents of a dataset, so that training reads latents instead of encoding.

    python -m fmboost_jax.precompute_latents --config=configs/lhq.py --workdir=~/data/lhq_latents
    # then train on them:
    python -m fmboost_jax.train --config=configs/lhq.py --workdir=runs/lhq \\
        --config.data.name=latents --config.data.path=~/data/lhq_latents

For every image of the config's source (`data.name` folder or tfds, split `--split`), center
cropped to `high_res_size`, it stores the VAE posterior of the image (`mean`, `logvar`) and of
its PSU input (`mean_lowres`, `logvar_lowres`: the low-res image bilinearly up-sampled back to
the high-res size in pixel space, then encoded), unscaled, (h, w, C) float32 each, plus the
image itself with `--store_images` (needed to evaluate from the records). Training takes the
posterior mode or a sample (`data.latent_sample`).

The work is batched and sharded across all devices of all processes (run it like training on
every host); each process reads its own shard of the images and writes its own files,
`latents-pPPPPP-of-NNNNNN-cCCCCC.array_record`, one per chunk of `--chunk_batches` batches, each
written under a temporary name and renamed when complete. Rerunning the command skips complete
chunks, so an interrupted run resumes where it stopped.
"""

from __future__ import annotations

import json
import os
import time

import jax
import numpy as np
from absl import app, flags, logging
from array_record.python.array_record_module import ArrayRecordWriter
from jax.experimental import multihost_utils
from ml_collections import config_flags
from tqdm.auto import tqdm

from fmboost_jax import config as config_lib
from fmboost_jax import distributed
from fmboost_jax import sharding as sharding_lib
from fmboost_jax.cfm import CFM
from fmboost_jax.coupling import resize
from fmboost_jax.data import images as images_lib
from fmboost_jax.data import pipeline as data_pipeline
from fmboost_jax.data.sources import encode_latent_record

_CONFIG = config_flags.DEFINE_config_file("config", None, "Python config file.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Output directory for the latent records.")
_SPLIT = flags.DEFINE_enum("split", "train", ["train", "eval"], "Which part of the source.")
_BATCH = flags.DEFINE_integer("batch_size", 0, "Images per step over all devices "
                              "(default: config.batch_size).")
_CHUNK = flags.DEFINE_integer("chunk_batches", 64, "Batches per output file.")
_STORE_IMAGES = flags.DEFINE_bool("store_images", False, "Also store the uint8 images.")
_DISTRIBUTED = flags.DEFINE_enum("distributed", "auto", distributed.MODES,
                                 "Join a multi-process run (see fmboost_jax.train).")
flags.mark_flags_as_required(["config", "workdir"])


def chunk_path(workdir: str, process: int, count: int, chunk: int) -> str:
    return os.path.join(workdir, f"latents-p{process:06d}-of-{count:06d}-c{chunk:05d}.array_record")


def make_encode_fn(cfm: CFM, mesh):
    """Jitted (fs_params, images (B, H, W, 3)) -> the four moments, batch split over the mesh."""
    fs = cfm.first_stage
    size = cfm.high_res_size

    def encode(fs_params, images):
        mean, logvar = fs.moments(fs_params, images)
        psu = resize(cfm.lowres_images(images), (size, size), "bilinear")   # pixel space
        mean_lr, logvar_lr = fs.moments(fs_params, psu)
        return {"mean": mean, "logvar": logvar, "mean_lowres": mean_lr, "logvar_lowres": logvar_lr}

    split = sharding_lib.batch_sharding(mesh)
    return jax.jit(encode, in_shardings=(sharding_lib.replicated(mesh), split), out_shardings=split)


def _load(src, index: int, size: int) -> tuple[np.ndarray | None, str]:
    ex = src[index]
    try:
        img = images_lib.decode_rgb(ex["bytes"], ex["path"])
        h, w = img.shape[:2]
        if min(h, w) < size:
            raise images_lib.BadImage(f"{ex['path']}: {h}x{w} is smaller than {size}")
        crop = images_lib.center_crop(img, size, ex["path"])
        return np.round((crop + 1.0) * 127.5).astype(np.uint8), ex["path"]
    except images_lib.BadImage as err:
        logging.warning("Skipping %s", err)
        return None, ex["path"]


def precompute(config, workdir: str, split: str = "train", batch_size: int = 0,
               chunk_batches: int = 64, store_images: bool = False) -> dict:
    """Writes this process's latent records into `workdir`; returns counts and throughput."""
    config_lib.validate(config)
    if config.data.name not in ("folder", "tfds"):
        raise ValueError(f"config.data.name={config.data.name!r}: precomputing reads images from "
                         "a 'folder' or 'tfds' source")
    pid, nproc = jax.process_index(), jax.process_count()
    mesh = sharding_lib.make_mesh(config.mesh)
    batch_size = batch_size or config.batch_size
    if batch_size % mesh.size or batch_size % nproc:
        raise ValueError(f"--batch_size {batch_size} must be divisible by the {mesh.size} devices")
    per_process = batch_size // nproc
    os.makedirs(workdir, exist_ok=True)

    cfm = CFM.from_config(config)
    fs_params = sharding_lib.put_replicated(cfm.first_stage.init_params(jax.random.PRNGKey(0)),
                                            mesh)
    encode = make_encode_fn(cfm, mesh)
    src = data_pipeline.image_source(config, train=split == "train")
    mine = list(range(pid, len(src), nproc))             # this process's shard
    longest = -(-len(src) // nproc)
    num_chunks = -(-longest // (per_process * chunk_batches))
    if pid == 0:
        info = {"num_images": len(src), "high_res_size": config.high_res_size,
                "low_res_size": config.low_res_size, "first_stage": config.first_stage.name,
                "scale_factor": config.scale_factor, "shift_factor": config.shift_factor,
                "split": split, "processes": nproc}
        with open(os.path.join(workdir, "latents_info.json"), "w") as f:
            json.dump(info, f, indent=2)

    size = config.high_res_size
    written = skipped = 0
    start = time.perf_counter()
    bar = tqdm(total=len(mine), desc=f"encode {split}", unit="img", disable=pid != 0)
    for chunk in range(num_chunks):
        path = chunk_path(workdir, pid, nproc, chunk)
        # Every process runs every chunk's steps (they are collective) unless all are done.
        done = multihost_utils.process_allgather(np.array(os.path.exists(path))).all() \
            if nproc > 1 else os.path.exists(path)
        lo = chunk * per_process * chunk_batches
        indices = mine[lo:lo + per_process * chunk_batches]
        if done:
            bar.update(len(indices))
            continue
        tmp = path + ".tmp"
        writer = ArrayRecordWriter(tmp, "group_size:1")
        # The same number of steps on every process: the longest shard's.
        for b in range(min(chunk_batches, -(-(longest - lo) // per_process))):
            part = indices[b * per_process:(b + 1) * per_process]
            loaded = [_load(src, i, size) for i in part]
            ok = [(img, name) for img, name in loaded if img is not None]
            skipped += len(loaded) - len(ok)
            batch = np.zeros((per_process, size, size, 3), np.uint8)
            for j, (img, _) in enumerate(ok):
                batch[j] = img
            images = sharding_lib.global_batch(
                {"x": images_lib.to_float(batch)}, mesh)["x"]
            out = encode(fs_params, images)
            local = {k: np.concatenate([np.asarray(s.data) for s in sorted(
                v.addressable_shards, key=lambda s: s.index[0].start or 0)]) for k, v in out.items()}
            for j, (img, name) in enumerate(ok):
                record = {k: v[j] for k, v in local.items()}
                record["name"] = name
                if store_images:
                    record["image"] = img
                writer.write(encode_latent_record(record))
                written += 1
            bar.update(len(part))
        writer.close()
        os.replace(tmp, path)
    bar.close()
    seconds = time.perf_counter() - start
    result = {"process": pid, "written": written, "skipped": skipped, "seconds": seconds,
              "images_per_sec": written / max(seconds, 1e-9)}
    logging.info("precompute: %s", json.dumps(result))
    return result


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    logging.set_verbosity(logging.INFO)
    distributed.initialize(_DISTRIBUTED.value)
    precompute(_CONFIG.value, os.path.expanduser(_WORKDIR.value), _SPLIT.value, _BATCH.value,
               _CHUNK.value, _STORE_IMAGES.value)


if __name__ == "__main__":
    app.run(main)
